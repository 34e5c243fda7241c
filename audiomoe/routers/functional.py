"""Shared routing maths (not components): building a Routing record, load counts, balance losses.

Kept as plain functions so every router, built-in or third-party, computes statistics the same
way and padded items are excluded everywhere.
"""

from __future__ import annotations

from typing import Optional

import torch

from audiomoe.core.interfaces import Routing


def make_routing(
    logits: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    item_mask: Optional[torch.Tensor] = None,
    aux_losses: Optional[dict[str, torch.Tensor]] = None,
) -> Routing:
    """Build a :class:`Routing` from dense ``mask``/``weights`` [N, E]; padded items select nothing."""
    if item_mask is not None:
        mask = mask & item_mask[:, None]
        weights = weights * item_mask[:, None].to(weights.dtype)
    counts = mask.sum(0)
    k = int(mask.sum(-1).max()) if mask.numel() else 0
    # Descending weight order; unselected columns sort last and are marked -1.
    order = torch.where(mask, weights.detach(), torch.full_like(weights.detach(), -1.0)).argsort(-1, descending=True)[:, :k]
    picked = mask.gather(-1, order)
    indices = torch.where(picked, order, torch.full_like(order, -1))
    return Routing(logits, mask, weights, indices, counts, dict(aux_losses or {}), item_mask)


def switch_balance_loss(probs: torch.Tensor, mask: torch.Tensor, item_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer load balance ``E * sum_i f_i * P_i`` over valid items.

    ``f_i`` is the share of selections going to column i (a fraction of all picks), ``P_i`` the
    mean router probability of column i. Equals 1 when routing is perfectly uniform.
    """
    e = probs.shape[-1]
    m = mask.to(probs.dtype)
    if item_mask is not None:
        keep = item_mask.to(probs.dtype)[:, None]
        probs, m = probs * keep, m * keep
        n = keep.sum().clamp_min(1.0)
    else:
        n = torch.tensor(float(max(probs.shape[0], 1)), device=probs.device)
    f = m.sum(0) / m.sum().clamp_min(1.0)
    p = probs.sum(0) / n
    return e * (f * p).sum()
