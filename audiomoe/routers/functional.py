"""Shared routing maths (not components): selection rules, balance losses, schedules, pooling.

Kept as plain functions so every router, built-in or third-party, computes statistics the same
way and padded items are excluded everywhere. Selection rules (DESIGN.md "Semantics that must be
exact"): top-k; top-p as UniMoE-Audio's code (``k = 1 + #(cumsum(sorted softmax) < p)``, first
column always kept) or Huang et al.'s strict ``cumsum > p``; SparseMixer multipliers.
Losses: Switch ``E * sum f_i P_i``, UniMoE-Audio's aux loss (P renormalised over the selected
set, null columns counted), router z-loss, router entropy.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from audiomoe.core.decoding import is_generating
from audiomoe.core.errors import AudioMoEError
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
    if is_generating() or not torch.is_grad_enabled():  # rarely read without training: computed on first read
        return LazyRouting(logits, mask, weights, None, None, dict(aux_losses or {}), item_mask)
    return Routing(logits, mask, weights, picked_indices(mask, weights), mask.sum(0), dict(aux_losses or {}), item_mask)


def picked_indices(mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The selected columns of each item [N, K] in descending weight order, ``-1`` padded (K = the most any item picked)."""
    k = int(mask.sum(-1).max()) if mask.numel() else 0
    # unselected columns sort last and are marked -1
    order = torch.where(mask, weights.detach(), torch.full_like(weights.detach(), -1.0)).argsort(-1, descending=True)[
        :, :k
    ]
    picked = mask.gather(-1, order)
    return torch.where(picked, order, torch.full_like(order, -1))


def _lazy_field(name: str, compute: Callable[["LazyRouting"], Any]) -> property:
    """A :class:`LazyRouting` field: a value set (or deferred with :meth:`LazyRouting.defer`) wins, else ``compute``."""

    def get(self: "LazyRouting") -> Any:
        d = self.__dict__
        if d.get("_" + name) is None:
            thunk = d.pop("_defer_" + name, None)
            d["_" + name] = thunk() if thunk is not None else compute(self)
        return d["_" + name]

    def set_(self: "LazyRouting", value: Any) -> None:
        self.__dict__.pop("_defer_" + name, None)
        self.__dict__["_" + name] = value

    return property(get, set_, doc=f"``{name}``, computed when first read.")


class LazyRouting(Routing):
    """A :class:`Routing` of a no-grad call whose ``indices``, ``counts`` and ``applied`` are computed when first read.

    A decoding step reads none of them: each would be ops per layer per step for nothing. Values are the
    same as the eager record's (``indices`` from ``mask`` and ``weights``, ``counts`` the per-column sum of
    ``mask``; ``applied`` as deferred by the MoE layer, else None = ``weights`` applied as is).
    """

    indices = _lazy_field("indices", lambda r: picked_indices(r.mask, r.weights))  # type: ignore[assignment]  # a property here, a field on the base
    counts = _lazy_field("counts", lambda r: r.mask.sum(0))  # type: ignore[assignment]  # as above
    applied = _lazy_field("applied", lambda r: None)  # type: ignore[assignment]  # as above

    def defer(self, name: str, thunk: Callable[[], Any]) -> None:
        """Compute field ``name`` with ``thunk`` when it is first read (the MoE layer's ``applied`` weights)."""
        self.__dict__["_" + name] = None
        self.__dict__["_defer_" + name] = thunk


def switch_balance_loss(
    probs: torch.Tensor, mask: torch.Tensor, item_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
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


# -- checks -----------------------------------------------------------------------------------


def check_logits(logits: torch.Tensor, num_columns: Optional[int] = None, where: str = "router") -> None:
    """Raise :class:`AudioMoEError` if ``logits`` [N, E] has NaN/inf or the wrong number of columns."""
    if logits.dim() != 2:
        raise AudioMoEError(f"{where} logits must be [items, columns], got shape {tuple(logits.shape)}")
    if num_columns is not None and logits.shape[-1] != num_columns:
        raise AudioMoEError(f"{where} logits have {logits.shape[-1]} columns, expected num_experts={num_columns}")
    # one reduction read on the host: a finite sum means finite logits; a non-finite one (NaN/inf, or a sum
    # of huge finite logits overflowing) is looked at element by element, so the error is raised exactly as before
    if math.isfinite(logits.sum().item()):
        return
    if not bool(torch.isfinite(logits).all()):
        bad = ~torch.isfinite(logits)
        n_nan = int(torch.isnan(logits).sum())
        raise AudioMoEError(
            f"{where} logits contain {n_nan} NaN and {int(bad.sum()) - n_nan} inf value(s) out of {logits.numel()}; "
            "logits must be finite: check the inputs, the learning rate, or enable the scorer's fp32 option"
        )


def check_k(k: int, num_columns: int, what: str = "k") -> None:
    """Raise if ``k`` is not in ``[1, num_columns]`` (naming the value and the limit)."""
    if int(k) > num_columns:
        raise AudioMoEError(
            f"router {what}={k} is larger than the number of columns ({num_columns}); use {what} <= {num_columns}"
        )
    if int(k) < 1:
        raise AudioMoEError(f"router {what}={k} must be at least 1 (and at most the number of columns, {num_columns})")


def check_p(p: float) -> None:
    """Raise if the top-p threshold ``p`` is outside (0, 1]."""
    if not (0.0 < float(p) <= 1.0):
        raise AudioMoEError(f"top-p threshold p={p} must be in (0, 1] (UniMoE-Audio uses 0.7)")


# -- selection --------------------------------------------------------------------------------


def top_k_select(
    logits: torch.Tensor, k: int, normalize: bool = True, top1: str = "raw"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k: keep the ``k`` largest logits; weights ``P_i / sum_{j in S} P_j`` (or raw ``P_i``).

    Columns are ranked by logit, as ``torch.topk`` on the logits (UniMoE-Audio's code ranks by
    ``torch.max`` of the logits): logits one float step apart can round to the same probability.
    With ``k == 1`` the renormalised weight is ``P/P = 1``, a constant that sends the task loss no
    gradient; ``top1`` then chooses ``"raw"`` (``w = P``, Switch Transformer) or
    ``"straight_through"`` (``w = 1 + P - sg(P)``: value 1, gradient of ``P``).
    Returns ``(mask [N, E] bool, weights [N, E], probs [N, E])``.
    """
    check_k(k, logits.shape[-1])
    probs = logits.softmax(-1)
    # stable sort: an exact tie goes to the lower column index, as torch.max in the released code
    top_i = logits.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_i, True)
    weights = probs * mask
    if normalize and k == 1:
        weights = _top1_weights(weights, mask, top1)
    elif normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return mask, weights, probs


def _top1_weights(weights: torch.Tensor, mask: torch.Tensor, top1: str) -> torch.Tensor:
    """Weights of single picks that still carry a gradient (see :func:`top_k_select`)."""
    if top1 == "raw":
        return weights
    if top1 == "straight_through":
        return weights + (mask.to(weights.dtype) - weights.detach()) * mask
    raise AudioMoEError(f"top1={top1!r} is not one of 'raw', 'straight_through'")


def single_pick_weights(weights: torch.Tensor, mask: torch.Tensor, probs: torch.Tensor, top1: str) -> torch.Tensor:
    """Give items with exactly one pick a task gradient when renormalisation made their weight 1.

    Used by top-p with renormalised weights: a token whose first column already reaches ``p`` gets
    ``P/P = 1``; ``top1`` (``"renorm"`` keeps the constant, ``"raw"``, ``"straight_through"``).
    """
    if top1 == "renorm":
        return weights
    single = (mask.sum(-1, keepdim=True) == 1) & mask
    return torch.where(single, _top1_weights(probs * mask, mask, top1), weights)


def top_p_count(
    probs: torch.Tensor,
    p: float,
    strict: bool = False,
    min_k: int = 1,
    max_k: Optional[int] = None,
    logits: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many columns top-p keeps per item, and the descending order of the columns.

    UniMoE-Audio code: ``k = 1 + #(cumsum(sorted P) < p)``; ``strict`` is Huang et al.'s
    ``cumsum > p`` rule: ``k = 1 + #(cumsum <= p)``. Both keep the first column, are clamped to
    ``[min_k, max_k]`` and to the number of columns. Columns are ordered by ``logits`` when given
    (the released code ranks by logit: near-equal logits can share one float probability, and the
    probability order would then pick another set); ``k`` comes from the probabilities taken in
    that order. Returns ``(k [N] long, order [N, E] long)``.
    """
    check_p(p)
    e = probs.shape[-1]
    max_k = e if max_k is None else max_k
    check_k(max_k, e, "max_experts")
    check_k(min_k, max_k, "min_experts")
    order = (probs if logits is None else logits).sort(dim=-1, descending=True, stable=True).indices
    c = probs.gather(-1, order).cumsum(-1)
    below = (c <= p) if strict else (c < p)
    k = (1 + below.sum(-1)).clamp(min_k, max_k)
    return k, order


def rank_mask(order: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mask [N, E] selecting the first ``k[n]`` columns of ``order[n]``."""
    keep = torch.arange(order.shape[-1], device=order.device)[None, :] < k[:, None]
    return torch.zeros_like(keep).scatter(-1, order, keep)


def sparse_mixer_weights(logits: torch.Tensor, order: torch.Tensor, k: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """UniMoE-Audio's deterministic SparseMixer multipliers over the selected columns, renormalised.

    For the r-th pick ``s`` (descending logits), the candidates are the not-yet-picked columns
    whose relative gap to ``l_s`` is not above ``2 eps``: ``not (l_s - l_j) / max(|l_j|, |l_s|) > 2 eps``
    (no clamp: a 0/0 gap is NaN and keeps the column, as the released code);
    the multiplier is ``softmax over candidates`` at ``s`` (1.0 for a clear winner). Weights are
    ``mult / (sum mult + 1e-6)`` (papers.md §2.3 step 3, ``ignore_differentiable_router=True``).
    """
    n, e = logits.shape
    kmax = int(k.max()) if n else 0
    # pick r's multiplier sits at column order[:, r]: gather them into [N, kmax] and scatter once
    picked = logits.new_zeros(n, kmax)
    detached = logits.detach()
    for r in range(kmax):
        # only the items that still pick at rank r (top-p: a shrinking set) are computed
        rows = (k > r).nonzero(as_tuple=True)[0]
        lr = logits.index_select(0, rows)
        sel = order.index_select(0, rows)[:, r : r + 1]
        with torch.no_grad():
            dr = detached.index_select(0, rows)
            m = dr.gather(-1, sel)
            # as released: no clamp on the denominator; a 0/0 gap (both logits 0) is NaN, and
            # NaN > 2 eps is False, so that column stays a candidate
            factor = dr.abs().clamp(min=m.abs())
            taken = torch.zeros_like(dr, dtype=torch.bool).scatter_(-1, order.index_select(0, rows)[:, :r], True)
            near = ~((m - dr) / factor > 2 * eps) & ~taken
            near.scatter_(-1, sel, True)
        gate = lr.masked_fill(~near, float("-inf")).softmax(-1).gather(-1, sel)
        picked = picked.index_put((rows, torch.full_like(rows, r)), gate[:, 0])
    mult = torch.zeros_like(logits).scatter(-1, order[:, :kmax], picked)
    return mult / (mult.sum(-1, keepdim=True) + 1e-6)


# -- losses -----------------------------------------------------------------------------------


def _valid_weights(n: int, item_mask: Optional[torch.Tensor], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if item_mask is None:
        keep = torch.ones(n, 1, dtype=like.dtype, device=like.device)
    else:
        keep = item_mask.to(like.dtype)[:, None]
    return keep, keep.sum().clamp_min(1.0)


def unimoe_aux_loss(logits: torch.Tensor, mask: torch.Tensor, item_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """UniMoE-Audio aux loss ``E * sum_i f_i * P_i`` over the given columns (routed + null).

    ``P~ = softmax(logits restricted to the selected set)``, ``f_i`` = mean over valid items of
    ``mask[:, i]`` (sums to the mean number of picks), ``P_i`` = mean of ``P~[:, i]`` (papers.md §2.4).
    """
    e = logits.shape[-1]
    lg = logits.float()
    restricted = lg.masked_fill(~mask, torch.finfo(lg.dtype).min).softmax(-1)
    keep, n = _valid_weights(lg.shape[0], item_mask, lg)
    f = (mask.to(lg.dtype) * keep).sum(0) / n
    p = (restricted * keep).sum(0) / n
    return e * (f * p).sum()


def z_loss(logits: torch.Tensor, item_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): ``mean over valid items of logsumexp(logits)^2``."""
    lg = logits.float()
    keep, n = _valid_weights(lg.shape[0], item_mask, lg)
    return (lg.logsumexp(-1, keepdim=True).pow(2) * keep).sum() / n


def entropy_loss(probs: torch.Tensor, item_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean per-item router entropy ``-sum_i P_i log P_i`` over valid items (Huang et al.'s dynamic loss)."""
    keep, n = _valid_weights(probs.shape[0], item_mask, probs)
    h = -(probs * probs.clamp_min(1e-12).log()).sum(-1, keepdim=True)
    return (h * keep).sum() / n


def scheduled_weight(
    start: float, end: Optional[float], steps: int, step: torch.Tensor, kind: str = "linear"
) -> torch.Tensor:
    """Loss weight at ``step``: ``start`` -> ``end`` over ``steps`` (``linear`` or ``cosine``), then ``end``.

    ``end=None`` means constant ``start``. Computed as a tensor so no device sync is needed.
    UniMoE-Audio: linear 0.025 -> 0.001 over 10,000 steps.
    """
    if end is None or steps <= 0:
        return torch.tensor(float(start), device=step.device)
    t = (step.float() / steps).clamp(0.0, 1.0)
    if kind == "cosine":
        t = 0.5 * (1.0 - torch.cos(torch.pi * t))
    elif kind != "linear":
        raise AudioMoEError(f"schedule kind '{kind}' is not one of: linear, cosine")
    return start + (end - start) * t


# -- pooling ----------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``x`` [B, T, D] over valid frames (``valid`` [B, T] True = valid); all-padded rows give 0."""
    if valid is None:
        return x.mean(1)
    w = valid.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)
