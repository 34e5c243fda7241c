"""Top-p (dynamic-k) selection: UniMoE-Audio's code (arXiv 2510.13344) and Huang et al. 2024 (arXiv 2403.07652).

Softmax over every column given (routed + null experts: the MoE layer asks for
``num_experts = routed + null``), sort descending, cumulative sum ``c``;
``k = 1 + #(c < p)`` (UniMoE code: the column whose inclusion reaches ``p`` is kept, the first
column always) or, with ``strict``, Huang et al.'s ``k = 1 + #(c <= p)`` (``cumsum > p`` rule).
``k`` is clamped to ``[min_experts, max_experts]``. Weights:

- ``renorm`` (paper Eq. 3): ``w_i = P_i / sum_{j in S} P_j``;
- ``raw`` (Huang et al.): ``w_i = P_i``;
- ``unimoe_code``: SparseMixer near-tie multipliers (eps = ``mixer_eps``), renormalised, as the
  released code computes them in deterministic mode (each pick ~1/k; papers.md §2.3 step 3).

Columns are ranked by logit (the released code's ``torch.max`` order), ``k`` is counted on the
probabilities in that order. A token whose first column reaches ``p`` alone gets the renormalised
weight ``P/P = 1``, which carries no task gradient; ``top1`` chooses what such tokens get:
``renorm`` (the constant, as the paper's Eq. 3), ``raw`` (``P``) or ``straight_through``
(``1 + P - sg(P)``). The released code's task gradient reaches the gate through the gated shared
experts' joint softmax instead (MoE layer, ``shared_mode="gated"``).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.specs import Params
from audiomoe.routers.base import Selection, Selector
from audiomoe.routers.functional import check_k, rank_mask, single_pick_weights, sparse_mixer_weights, top_p_count


class TopP(Selector):
    """A variable number of columns per item: the smallest prefix whose probability reaches ``p``."""

    class Params(Params):
        p: float = Field(
            0.7, gt=0.0, le=1.0, description="cumulative probability threshold, in (0, 1] (UniMoE-Audio: 0.7)"
        )
        strict: bool = Field(False, description="Huang et al.'s 'cumsum > p' rule instead of UniMoE's 'cumsum >= p'")
        min_experts: int = Field(1, ge=1, le=4096, description="fewest columns per item")
        max_experts: Optional[int] = Field(None, ge=1, le=4096, description="most columns per item (None: no cap)")
        weights: Literal["renorm", "raw", "unimoe_code"] = Field(
            "renorm", description="combine weights: renormalised P (paper Eq. 3), raw P, or UniMoE code's SparseMixer"
        )
        mixer_eps: float = Field(0.01, ge=0.0, le=1.0, description="SparseMixer near-tie epsilon (unimoe_code weights)")
        top1: Literal["renorm", "raw", "straight_through"] = Field(
            "renorm",
            description="renorm weights, tokens with one pick: constant 1 (no task gradient), P, or 1 + P - sg(P)",
        )

    def __init__(self, params: Params, *, num_experts: int) -> None:
        super().__init__(params)
        p = self.params
        if p.max_experts is not None:
            check_k(p.max_experts, num_experts, "max_experts")
        check_k(p.min_experts, p.max_experts or num_experts, "min_experts")

    def forward(self, logits: torch.Tensor) -> Selection:
        """Select per row the smallest descending prefix with cumulative softmax reaching ``p``."""
        p = self.params
        probs = logits.softmax(-1)
        if p.max_experts is not None and p.max_experts > logits.shape[-1]:
            raise AudioMoEError(
                f"max_experts={p.max_experts} is larger than the number of columns ({logits.shape[-1]})"
            )
        k, order = top_p_count(probs, p.p, p.strict, p.min_experts, p.max_experts, logits=logits)
        mask = rank_mask(order, k)
        if p.weights == "unimoe_code":
            weights = sparse_mixer_weights(logits, order, k, p.mixer_eps)
        else:
            weights = probs * mask
            if p.weights == "renorm":
                weights = single_pick_weights(weights / weights.sum(-1, keepdim=True), mask, probs, p.top1)
        return Selection(mask, weights, probs)
