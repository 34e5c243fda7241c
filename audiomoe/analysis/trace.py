"""The routing trace: which columns (experts or encoders) each sample used, per layer, with weights.

Built from ``ModelOutput.routing`` (layer name -> :class:`audiomoe.core.interfaces.Routing`)::

    out = model(batch)
    trace = RoutingTrace.from_output(out)        # detached, on CPU
    trace.summary()["backbone/layer0"]           # load max/mean, entropy, null share, experts/item
    trace.sample(0)["backbone/layer0"]["ids"]    # [T, K] picks of sample 0 (-1 = none)
    RoutingTrace.cat([t1, t2])                   # accumulate batches for plotting

Cheap: per layer it keeps the ``[N, K]`` picks and weights (K = most columns any item used),
the per-column load and a few scalars; never the dense ``[N, E]`` tensors. Token-level layers are
reshaped to ``[B, T, K]`` from ``Routing.item_shape`` (or, when a router did not set it, from the
batch size); sample-level layers (encoder routing) are ``[B, K]``. A record of part of the batch
(a head's decoder pass) has its own sample order: ``ModelOutput.routing_rows[name]`` gives each of
its samples' batch index (``ModelOutput.routing_tasks`` their tasks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Routing


@dataclass
class LayerTrace:
    """One routed layer: ``ids``/``weights`` [B, K] or [B, T, K] (ids -1 = no pick), ``valid`` [B] or [B, T].

    ``counts`` [E] is the load per column over valid items; ``entropy_sum`` the summed per-item
    router entropy (nats) over valid items; ``null_columns`` how many of the last columns are null;
    ``dropped`` [B] or [B, T] the pairs each item lost to expert capacity (None when dropless).
    ``weights`` are the weights finally applied (``Routing.applied`` when an MoE layer set it:
    after drops, renormalisation and the gated shared experts' share); ``shared`` [B(, T), S] the
    shared experts' weights (None without shared experts).
    """

    ids: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor
    entropy_sum: float
    null_columns: int = 0
    dropped: Optional[torch.Tensor] = None
    shared: Optional[torch.Tensor] = None

    @property
    def num_columns(self) -> int:
        """E, the number of columns routed over."""
        return int(self.counts.shape[0])

    def summary(self) -> dict[str, float]:
        """Load max/mean, load entropy (normalised: 1 = balanced), router entropy, null share, picks per item."""
        counts = self.counts.double()
        total = float(counts.sum())
        n_items = int(self.valid.sum())
        e = self.num_columns
        share = counts / max(total, 1.0)
        load_entropy = float(-(share * share.clamp_min(1e-12).log()).sum()) / math.log(e) if e > 1 else 1.0
        picks = (self.ids >= 0) & self.valid[..., None]
        null = (self.ids >= e - self.null_columns) & picks if self.null_columns else torch.zeros_like(picks)
        out = {
            "load_max_over_mean": float(counts.max() / counts.mean().clamp_min(1e-12)) if e else 0.0,
            "load_entropy": load_entropy,
            "router_entropy": self.entropy_sum / max(n_items, 1),
            "null_share": float(null.sum()) / max(float(picks.sum()), 1.0),
            "experts_per_item": float(picks.sum()) / max(n_items, 1),
            "real_experts_per_item": float((picks & ~null).sum()) / max(n_items, 1),
            "items": float(n_items),
        }
        if self.dropped is not None:  # share of the selected pairs that capacity removed
            out["dropped_share"] = float(self.dropped[self.valid].sum()) / max(float(picks.sum()), 1.0)
        return out


def _layer_from_routing(r: Routing, batch_size: Optional[int]) -> LayerTrace:
    n = r.mask.shape[0]
    with torch.no_grad():
        ids = r.indices.detach()
        applied = r.weights if r.applied is None else r.applied
        w = applied.detach().float().gather(-1, ids.clamp_min(0)) * (ids >= 0)
        valid = (
            torch.ones(n, dtype=torch.bool, device=ids.device) if r.item_mask is None else r.item_mask.detach().bool()
        )
        logp = r.logits.detach().float().log_softmax(-1)
        ent = -(logp.exp() * logp).sum(-1)
        entropy_sum = float(ent[valid].sum())
        counts = r.counts.detach().long().cpu()
    shape = tuple(r.item_shape) if r.item_shape else (n,)
    if len(shape) == 1 and batch_size and n != batch_size and n % batch_size == 0:
        shape = (batch_size, n // batch_size)
    if math.prod(shape) != n:
        raise AudioMoEError(f"routing item_shape {shape} does not match its {n} items")
    k = ids.shape[-1]
    return LayerTrace(
        ids=ids.cpu().reshape(*shape, k),
        weights=w.cpu().reshape(*shape, k),
        valid=valid.cpu().reshape(shape),
        counts=counts,
        entropy_sum=entropy_sum,
        null_columns=int(r.null_columns),
        dropped=None if r.dropped is None else r.dropped.detach().cpu().reshape(shape),
        shared=None if r.shared_weights is None else r.shared_weights.detach().float().cpu().reshape(*shape, -1),
    )


def _pad_shared(x: torch.Tensor, tmax: int) -> torch.Tensor:
    """Pad shared weights [B, T, S] to ``tmax`` frames (sample-level [B, S] unchanged)."""
    if x.dim() != 3:
        return x
    y = x.new_zeros(x.shape[0], tmax, x.shape[2])
    y[:, : x.shape[1]] = x
    return y


@dataclass
class RoutingTrace:
    """Routing decisions of one (or several concatenated) batches, by layer name."""

    layers: dict[str, LayerTrace] = field(default_factory=dict)

    @classmethod
    def from_routing(cls, routing: Mapping[str, Routing], batch_size: Optional[int] = None) -> "RoutingTrace":
        """Trace a ``{layer name: Routing}`` mapping; ``batch_size`` reshapes flat token routings to [B, T]."""
        return cls({name: _layer_from_routing(r, batch_size) for name, r in routing.items()})

    @classmethod
    def from_output(cls, output: Any) -> "RoutingTrace":
        """Trace an :class:`audiomoe.model.ModelOutput` (batch size from its per-task ``indices``)."""
        b = sum(int(v.numel()) for v in getattr(output, "indices", {}).values()) or None
        return cls.from_routing(output.routing, b)

    @property
    def batch_size(self) -> int:
        """Number of samples traced (0 if no layer)."""
        return next((int(t.ids.shape[0]) for t in self.layers.values()), 0)

    def sample(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """Sample ``i``'s picks per layer: ``{"ids", "weights", "valid"}`` ([T, K] / [T], or [K] / []), plus ``dropped`` / ``shared``."""
        if not 0 <= i < self.batch_size:
            raise AudioMoEError(f"sample index {i} is out of range for a trace of {self.batch_size} samples")
        out = {}
        for name, t in self.layers.items():
            out[name] = {"ids": t.ids[i], "weights": t.weights[i], "valid": t.valid[i]}
            if t.dropped is not None:
                out[name]["dropped"] = t.dropped[i]
            if t.shared is not None:
                out[name]["shared"] = t.shared[i]
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        """Per layer: load max/mean, load and router entropy, null share, experts per item."""
        return {name: t.summary() for name, t in self.layers.items()}

    @classmethod
    def cat(cls, traces: Sequence["RoutingTrace"]) -> "RoutingTrace":
        """Concatenate traces of several batches along the sample axis (sequence lengths padded)."""
        if not traces:
            return cls()
        names = list(traces[0].layers)
        out: dict[str, LayerTrace] = {}
        for name in names:
            parts = [t.layers[name] for t in traces if name in t.layers]
            if len(parts) != len(traces):
                raise AudioMoEError(f"layer '{name}' is missing from some traces; concatenate traces of the same model")
            nd = parts[0].ids.dim()
            k = max(p.ids.shape[-1] for p in parts)
            tmax = max(p.ids.shape[1] for p in parts) if nd == 3 else 0

            def pad(
                x: torch.Tensor, fill: float, last: bool = True, tmax: int = tmax, nd: int = nd, k: int = k
            ) -> torch.Tensor:
                sizes = [x.shape[0]] + ([tmax] if nd == 3 else []) + ([k] if last else [])
                y = torch.full(sizes, fill, dtype=x.dtype)
                y[tuple(slice(0, s) for s in x.shape)] = x
                return y

            out[name] = LayerTrace(
                ids=torch.cat([pad(p.ids, -1) for p in parts]),
                weights=torch.cat([pad(p.weights, 0.0) for p in parts]),
                valid=torch.cat([pad(p.valid, False, last=False) for p in parts]),
                counts=sum((p.counts for p in parts), torch.zeros_like(parts[0].counts)),
                entropy_sum=sum(p.entropy_sum for p in parts),
                null_columns=parts[0].null_columns,
                dropped=None
                if any(p.dropped is None for p in parts)
                else torch.cat([pad(p.dropped, 0, last=False) for p in parts]),
                shared=None
                if any(p.shared is None for p in parts)
                else torch.cat([_pad_shared(p.shared, tmax) for p in parts]),
            )
        return cls(out)
