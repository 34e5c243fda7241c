"""Top-k routing with a learned temperature per expert: ``p = softmax(x W / t)``, ``t = softplus(tau) + 0.1``.

A deliberately small example of a third-party router: a nested pydantic ``Params`` with the
knobs, sizes (``d_model``, ``num_experts``) injected by the composer, and a ``Routing`` record out.
"""

from typing import Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe import Params, Router, Routing


class TemperatureTopK(Router):
    """Linear gate, per-expert learned temperature, top-k; weights renormalised for k > 1, raw P for k = 1."""

    class Params(Params):
        k: int = Field(1, ge=1, description="experts per token")

    def __init__(self, params: Params, *, d_model: int, num_experts: int) -> None:
        super().__init__(params)
        if self.params.k > num_experts:
            raise ValueError(f"k={self.params.k} is larger than num_experts={num_experts}")
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.tau = nn.Parameter(torch.zeros(num_experts))

    def forward(self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids=None) -> Routing:
        """Route tokens ``inputs`` [N, D]."""
        logits = self.gate(inputs) / (nn.functional.softplus(self.tau) + 0.1)
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.params.k, dim=-1)
        if self.params.k > 1:  # a single pick keeps its raw P: P/P = 1 would give the router no task gradient
            top_p = top_p / top_p.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_i, True)
        if item_mask is not None:
            mask, weights = mask & item_mask[:, None], weights * item_mask[:, None]
        indices = torch.where(mask.gather(-1, top_i), top_i, torch.full_like(top_i, -1))
        return Routing(logits, mask, weights, indices, mask.sum(0), {}, item_mask)
