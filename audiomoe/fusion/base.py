"""Shared helpers of the fusion components (not a part): routing a mixture's samples, weighted sums.

A fusion owns the routers that pick weak encoders (so the paper's two-router form is one fusion
with two router slots) and the combination rule. The mixture hands it the base features and, for
each weak encoder ``k`` that any sample selected, ``(idx_k, z_k)``: the samples that ran it and
their projected, time-aligned features ``[len(idx_k), N, C]``.
"""

from __future__ import annotations

from typing import Literal, Mapping, Optional

import torch
from pydantic import Field

from audiomoe.core.interfaces import Routing
from audiomoe.core.specs import Params

WeakFeatures = Mapping[int, tuple[torch.Tensor, torch.Tensor]]


class RouterInput(Params):
    """What the routers of a fusion look at."""

    router_input: Literal["sequence", "pooled"] = Field(
        "sequence",
        description="give the routers base features [B, N, D] + frame mask, or their mean over valid frames [B, D]",
    )


def route(
    router: torch.nn.Module, how: str, base: torch.Tensor, valid: torch.Tensor, task_ids: Optional[torch.Tensor]
) -> Routing:
    """One per-sample routing decision over the weak encoders from the base features ``[B, N, D]``."""
    if how == "sequence":
        r = router(base, valid, task_ids)
    else:
        pooled = (base * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        r = router(pooled, valid.any(1), task_ids)
    r.item_shape = (base.shape[0],)
    return r


def weighted_sum(weights: torch.Tensor, weak: WeakFeatures, like: torch.Tensor, width: int) -> torch.Tensor:
    """``z = sum_k w[:, k] z_k`` [B, N, C]: each encoder's features weighted by its per-sample weight (0 where unselected)."""
    z = like.new_zeros(like.shape[0], like.shape[1], width)
    for k, (idx, feats) in weak.items():
        z = z.index_add(0, idx, feats * weights[idx, k].to(feats.dtype)[:, None, None])
    return z
