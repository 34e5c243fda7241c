"""The MoE layer's maths as small functions: capacity, token drops, drop renormalisation, shared gating.

- Capacity (GShard, Lepikhin et al. 2020): ``C = max(min_capacity, ceil(cf * B / columns))`` with
  ``B`` the selected pairs (``cf * k * T / E``) or the valid tokens (``cf * T / E``; the released
  UniMoE-Audio code counts every row, padding included); null columns count in ``columns``.
- Drops: per expert keep the first ``C`` pairs by position (GShard/Switch) or the ``C`` with the
  largest router logit (UniMoE-Audio's ``drop_policy="probs"``); optionally the null columns too.
- Renormalisation after drops (UniMoE-Audio): a token's kept weights are rescaled to its selected
  mass; a token that lost every pick keeps zero weight.
- Gated shared experts (UniMoE-Audio's ``calculate_audio_global_routing_weight``):
  ``g = softmax([logits masked to the selected routed + null columns, shared logits])``; routed
  weights become ``w * sum g_dyn`` and shared expert ``s`` gets ``g_s``.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

import torch

from audiomoe.core.errors import AudioMoEError


def capacity_of(num_selected: int, num_columns: int, capacity_factor: float, min_capacity: int) -> int:
    """Per-column capacity ``max(min_capacity, ceil(factor * num_selected / num_columns))``, computed exactly.

    The factor is read as the decimal it was written as (``1.1`` is 11/10), so cf 1.1 with 90 tokens over 9
    columns gives 11, as the exact value and UniMoE-Audio's code do; in float64 ``1.1 * 90 / 9`` is
    11.000000000000002, whose ceiling (12) would keep one pair per column too many.
    """
    exact = Fraction(repr(float(capacity_factor))) * int(num_selected) / max(int(num_columns), 1)
    return max(int(min_capacity), math.ceil(exact))


def drop_over_capacity(
    exp: torch.Tensor,
    tok: torch.Tensor,
    counts: torch.Tensor,
    capacity: int,
    policy: str = "position",
    scores: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` pairs per column: ``(exp, tok, counts)`` kept, then ``(exp, tok)`` dropped.

    Input pairs are sorted by column (:func:`audiomoe.moe.dispatcher.sorted_pairs`); the kept
    pairs stay grouped by column. ``policy="probs"`` ranks each column's pairs by ``scores`` [S].
    """
    if policy == "probs":
        if scores is None:
            raise AudioMoEError("drop policy 'probs' needs the pair scores (router logits)")
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[torch.argsort(exp[order], stable=True)]
        exp, tok = exp[order], tok[order]
    elif policy != "position":
        raise AudioMoEError(f"drop policy {policy!r} is not one of 'position', 'probs'")
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(exp.numel(), device=exp.device) - starts[exp]
    keep = rank < capacity
    if bool(keep.all()):
        return exp, tok, counts, exp[:0], tok[:0]
    return exp[keep], tok[keep], counts.clamp(max=capacity), exp[~keep], tok[~keep]


def null_drops(
    mask: torch.Tensor, logits: torch.Tensor, first_null: int, capacity: int, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(column, token)`` of the null-column picks over ``capacity``, by the same policy as routed columns."""
    cols = torch.arange(first_null, mask.shape[1], device=mask.device)
    n_exp, n_tok = mask[:, cols].t().nonzero(as_tuple=True)
    n_counts = torch.bincount(n_exp, minlength=cols.numel())
    scores = logits.detach()[n_tok, cols[n_exp]] if policy == "probs" else None
    *_, x_exp, x_tok = drop_over_capacity(n_exp, n_tok, n_counts, capacity, policy, scores)
    return cols[x_exp], x_tok


def renormalize_after_drops(weights: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Rescale each token's kept weights to its selected mass (UniMoE-Audio); all-dropped tokens get 0."""
    selected = (weights * mask).sum(-1, keepdim=True)
    weights = weights * kept
    total = weights.sum(-1, keepdim=True)
    # the double where keeps the unused branch finite, so no NaN reaches the gradient (UniMoE: +1e-6)
    has = total != 0
    return weights * torch.where(
        has, selected / torch.where(has, total, torch.ones_like(total)), torch.zeros_like(total)
    )


def gate_shared(
    weights: torch.Tensor, logits: torch.Tensor, gate_mask: torch.Tensor, shared_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(routed weights x sum g_dyn, shared weights g_s)`` from the joint softmax over the kept and shared columns."""
    # the softmax in fp32 at least (torch.promote_types with float32, decided in Python: no op per layer per step)
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    dyn = as_dtype(logits, ct).masked_fill(~gate_mask, float("-inf"))
    joint = torch.cat([dyn, as_dtype(shared_logits, ct)], -1).softmax(-1)
    n = logits.shape[-1]
    return weights * as_dtype(joint[:, :n].sum(-1, keepdim=True), weights.dtype), joint[:, n:]


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, with no op at all when it already is (a decoding step's per-layer casts are mostly no-ops)."""
    return t if t.dtype == dtype else t.to(dtype)
