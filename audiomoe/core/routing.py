"""The routing record every router returns and every routed layer reports (imported by ``interfaces``).

One :class:`Routing` per routed layer: the router's logits, the selection mask and weights over
routed + null columns, the picked ids in weight order, counts, aux losses and, after the MoE
layer combined it, the weights finally applied. The routing trace and the reports read these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Routing:
    """One router call's decision over ``E`` columns for ``N`` items (tokens or samples).

    - ``logits`` [N, E]: raw scores.
    - ``mask`` [N, E] bool: which columns each item selected.
    - ``weights`` [N, E]: combine weights, zero where not selected (differentiable).
    - ``indices`` [N, K] long: selected columns in descending weight order, ``-1`` padded
      (K = the most any item picked; top-p picks a variable number).
    - ``counts`` [E]: load per column over valid items.
    - ``aux_losses``: named, already weighted losses to add to the training loss.
    - ``item_mask`` [N] bool or None: True for valid (non-padded) items.
    - ``item_shape``: the leading shape the N items were flattened from (``(B, T)`` for token
      routing, ``(B,)`` for per-sample routing), so a trace can map items back to samples.
    - ``null_columns``: how many of the *last* columns are null experts (set by the MoE layer).
    - ``dropped`` [N] long or None: selected pairs of each item removed by expert capacity (set by
      an MoE layer with a capacity factor; None when dispatch is dropless).
    - ``inputs`` [N, D] or None: what the scorer scored (after training jitter and any fp32
      cast); an MoE layer's gated shared experts score the same (one gate, as UniMoE-Audio).
    - ``applied`` [N, E] or None: the weights an MoE layer finally applied (after drops, drop
      renormalisation and the gated shared experts' share; None: ``weights`` were applied as is).
    - ``shared_weights`` [N, S] or None: each shared expert's weight per item (1 in unit mode).
    """

    logits: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    item_mask: Optional[torch.Tensor] = None
    item_shape: Optional[tuple[int, ...]] = None
    null_columns: int = 0
    dropped: Optional[torch.Tensor] = None
    inputs: Optional[torch.Tensor] = None
    applied: Optional[torch.Tensor] = None
    shared_weights: Optional[torch.Tensor] = None

    @property
    def num_columns(self) -> int:
        """E, the number of columns (experts or encoders) routed over."""
        return self.logits.shape[-1]

    def summary(self) -> dict[str, float]:
        """Cheap statistics: load max/mean, mean columns per item."""
        counts = self.counts.detach().float()
        valid = self.mask if self.item_mask is None else self.mask[self.item_mask]
        per_item = valid.sum(-1).float()
        out = {
            "load_max_over_mean": float(counts.max() / counts.mean().clamp_min(1e-9)),
            "columns_per_item": float(per_item.mean()) if per_item.numel() else 0.0,
        }
        if self.dropped is not None:
            total = valid.sum()
            out["dropped_share"] = float(self.dropped.sum() / total.clamp_min(1)) if total.numel() else 0.0
        return out


def routing_problems(r: "Routing", n: int, e: int) -> list[str]:
    """What breaks the record's shape contract for ``n`` items over ``e`` columns (no device sync: run-time safe)."""
    if not isinstance(r, Routing):
        return [f"forward must return audiomoe.Routing, got {type(r).__name__}"]
    out = [
        f"routing.{a} must be [N, E] = ({n}, {e}), got {tuple(getattr(r, a).shape)}"
        for a in ("logits", "mask", "weights")
        if tuple(getattr(r, a).shape) != (n, e)
    ]
    if r.mask.dtype != torch.bool:
        out.append(f"routing.mask must be bool, got {r.mask.dtype}")
    # a lazily computed field (a no-grad call's record, routers.functional.LazyRouting) is the library's own: not
    # checked, so that checking does not compute it
    counts = r.__dict__.get("counts", r.__dict__.get("_counts"))
    if isinstance(counts, torch.Tensor) and tuple(counts.shape) != (e,):
        out.append(f"routing.counts must be [E] = ({e},), got {tuple(counts.shape)}")
    ids = r.__dict__.get("indices")
    if isinstance(ids, torch.Tensor) and (ids.dim() != 2 or ids.shape[0] != n or ids.dtype.is_floating_point):
        out.append(f"routing.indices must be integer [N, K] with N = {n}, got {ids.dtype} {tuple(ids.shape)}")
    return out


def indices_problems(r: "Routing") -> list[str]:
    """Value checks of ``indices`` against ``mask`` (reads the tensors: for conformance, not per step)."""
    ids, e = r.indices, r.mask.shape[-1]
    if ids.numel() == 0:
        return []
    if int(ids.min()) < -1 or int(ids.max()) >= e:
        return [
            f"routing.indices must be column ids in [0, {e}) or -1 padding, got values in [{int(ids.min())}, {int(ids.max())}]"
        ]
    picked = ids >= 0
    if not torch.equal(picked.sum(-1), r.mask.sum(-1)) or not r.mask.gather(-1, ids.clamp_min(0))[picked].all():
        return ["routing.indices must list exactly the columns routing.mask selects (then -1 padding)"]
    return []
