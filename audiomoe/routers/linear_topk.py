"""Linear top-k router (Shazeer et al. 2017 / Switch / Mixtral): ``p = softmax(x W)``, keep the k largest.

Equation: ``w_i = p_i / sum_{j in topk} p_j`` for the k selected columns when ``normalize`` (Mixtral),
else ``w_i = p_i``. Aux loss: Switch load balance ``E * sum_i f_i P_i`` times ``aux_loss_weight``.
The simplest learned router; kept as a baseline for ablations.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Router, Routing
from audiomoe.core.specs import Params
from audiomoe.routers.functional import make_routing, switch_balance_loss


class LinearTopK(Router):
    """Token or sample router: a bias-free linear gate and a top-k selection."""

    class Params(Params):
        k: int = Field(2, ge=1, description="columns selected per item")
        normalize: bool = Field(True, description="renormalise the k selected probabilities to sum to 1")
        aux_loss_weight: float = Field(0.01, ge=0.0, description="weight of the Switch load-balance loss")

    def __init__(self, params: Params, *, d_model: int, num_experts: int) -> None:
        super().__init__(params)
        if self.params.k > num_experts:
            raise AudioMoEError(f"router k={self.params.k} is larger than the number of columns ({num_experts}); use k <= {num_experts}")
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None) -> Routing:
        """Route ``inputs`` [N, D] to ``k`` of ``num_experts`` columns."""
        logits = self.gate(inputs)
        if not torch.isfinite(logits).all():
            raise AudioMoEError("router logits contain NaN or inf: check the inputs (and the learning rate)")
        probs = logits.float().softmax(-1)
        top_p, top_i = probs.topk(self.params.k, dim=-1)
        if self.params.normalize:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, top_i, top_p)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_i, True)
        aux = {}
        if self.params.aux_loss_weight > 0:
            aux["balance"] = self.params.aux_loss_weight * switch_balance_loss(probs, mask, item_mask)
        return make_routing(logits, mask, weights.to(inputs.dtype), item_mask, aux)
