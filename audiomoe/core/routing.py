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
