"""Top-k selection (Shazeer et al. 2017; Switch k=1; Mixtral k=2): keep the k most probable columns.

``P = softmax(logits)``; ``S`` = the k largest logits (an exact tie goes to the lower index);
weights ``w_i = P_i / sum_{j in S} P_j`` when ``normalize`` (Mixtral), else ``w_i = P_i``
(Shazeer, DeepSeekMoE). For ``k = 1`` the renormalised weight would be the constant 1 and the
router would learn nothing from the task loss, so ``top1`` picks the task-gradient path: ``raw``
(``w = P``, Switch Transformer, Fedus et al. 2021) or ``straight_through`` (``w = 1 + P - sg(P)``:
the forward value stays 1, the backward is that of ``P``).

``dense_steps`` (default 0) routes every column with weight ``P`` for the first optimizer steps of
training, then top-k. A router whose logits start equal (MoWE's zero-initialised data-independent
table) would otherwise pick the lowest index first and only ever learn about the columns it
happened to pick; a dense warm-up gives every column a gradient from the task loss, so the
choice that follows is made on what each column is worth (issue 26's "dense routing during a
warm-up"). Eval and generation always use top-k. The position is a persistent buffer (resumes).
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
        dense_steps: int = Field(
            0, ge=0, le=10**7, description="training steps that route every column weighted by P before top-k"
        )

    def __init__(self, params: Params, *, num_experts: int) -> None:
        super().__init__(params)
        check_k(self.params.k, num_experts)
        if self.params.dense_steps:  # only then: a default top-k keeps its (empty) state dict
            self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def advance_schedule(self) -> None:
        """One optimizer step passed: move the dense warm-up on (called by the trainer)."""
        if self.params.dense_steps:
            self.step += 1

    def warming_up(self) -> bool:
        """Whether this forward routes densely (training, within ``dense_steps``)."""
        return bool(self.params.dense_steps) and self.training and int(self.step) < self.params.dense_steps

    def forward(self, logits: torch.Tensor) -> Selection:
        """Select the ``k`` largest logits per row (weights from ``softmax(logits)``); every column while warming up."""
        if self.warming_up():
            probs = torch.softmax(logits, dim=-1)
            return Selection(torch.ones_like(logits, dtype=torch.bool), probs, probs)
        mask, weights, probs = top_k_select(logits, self.params.k, self.params.normalize, self.params.top1)
        return Selection(mask, weights, probs)
