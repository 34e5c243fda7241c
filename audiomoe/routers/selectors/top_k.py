"""Top-k selection (Shazeer et al. 2017; Switch k=1; Mixtral k=2): keep the k most probable columns.

``P = softmax(logits)``; ``S = topk(P, k)``; weights ``w_i = P_i / sum_{j in S} P_j`` when
``normalize`` (Mixtral), else ``w_i = P_i`` (Shazeer, DeepSeekMoE). Ties go to the lower index.
"""

from __future__ import annotations

import torch
from pydantic import Field

from audiomoe.core.specs import Params
from audiomoe.routers.base import Selection, Selector
from audiomoe.routers.functional import check_k, top_k_select


class TopK(Selector):
    """A fixed number ``k`` of columns per item."""

    class Params(Params):
        k: int = Field(2, ge=1, le=4096, description="columns selected per item (at most the number of columns)")
        normalize: bool = Field(True, description="renormalise the k selected probabilities to sum to 1")

    def __init__(self, params: Params, *, num_experts: int) -> None:
        super().__init__(params)
        check_k(self.params.k, num_experts)

    def forward(self, logits: torch.Tensor) -> Selection:
        """Select the ``k`` largest of ``softmax(logits)`` per row."""
        probs = logits.softmax(-1)
        mask, weights = top_k_select(probs, self.params.k, self.params.normalize)
        return Selection(mask, weights, probs)
