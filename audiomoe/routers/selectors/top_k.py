"""Top-k selection (Shazeer et al. 2017; Switch k=1; Mixtral k=2): keep the k most probable columns.

``P = softmax(logits)``; ``S`` = the k largest logits (an exact tie goes to the lower index);
weights ``w_i = P_i / sum_{j in S} P_j`` when ``normalize`` (Mixtral), else ``w_i = P_i``
(Shazeer, DeepSeekMoE). For ``k = 1`` the renormalised weight would be the constant 1 and the
router would learn nothing from the task loss, so ``top1`` picks the task-gradient path: ``raw``
(``w = P``, Switch Transformer, Fedus et al. 2021) or ``straight_through`` (``w = 1 + P - sg(P)``:
the forward value stays 1, the backward is that of ``P``).
"""

from __future__ import annotations

from typing import Literal

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
        top1: Literal["raw", "straight_through"] = Field(
            "raw",
            description="k=1 with normalize: weight P (Switch) or straight-through 1 + P - sg(P); both give the router a task gradient",
        )

    def __init__(self, params: Params, *, num_experts: int) -> None:
        super().__init__(params)
        check_k(self.params.k, num_experts)

    def forward(self, logits: torch.Tensor) -> Selection:
        """Select the ``k`` largest logits per row (weights from ``softmax(logits)``)."""
        mask, weights, probs = top_k_select(logits, self.params.k, self.params.normalize, self.params.top1)
        return Selection(mask, weights, probs)
