"""Mixture of Weak Encoders (MoWE-Audio; Zhang et al., ICASSP 2025, arXiv 2409.06635).

A strong base encoder ``E_b`` plus a pool of M light weak encoders ``E_1..E_M``; the fusion's
router(s) look at the base features (and the task) and pick weak encoders per sample:

    h_b = E_b(a)                                  [N, D_b] at the base frame rate
    r   = fusion.route(h_b)                       weights over M weak encoders, zero if unselected
    z_k = P_k(align(E_k(a)))                      [N, C]   for the selected k only
    h   = fusion(h_b, z, r)                       concat [h_b ; sum r_k z_k] (default) | sum | gated_sum |
                                                  MoWE's two routers [h_b ; z_indep ; z_dep]
    L   = L_task + aux_loss_weight * L_router     (MoWE: 0.1 x L_MoWE)

The model's adapter (``stack_mlp`` in the MoWE presets: stack 2 frames + 2-layer MLP) then maps
``h`` to ``d_model``: the mixture outputs fused features at the base frame rate.

The fusion is a component (kind ``fusion``, :mod:`audiomoe.fusion`) holding the routers as slots,
so ``--set encoder.fusion=sum`` or the two-router form is one word. Only the selected weak encoders
run, each only on the samples that selected it (the batch is grouped by selection and each group
is cut to its longest clip); a sample's unselected encoders contribute nothing. ``align`` resamples a weak encoder's frames in time onto the
base frames (linear interpolation or mean pooling, per item, by frame rate, see
:mod:`audiomoe.encoders.align`); ``P_k`` is a linear map to the common width ``C``. Weak encoders
whose sample rate differs from the base's get their audio resampled with torchaudio here.

Details the paper leaves open are params with documented defaults (fusion ``concat`` with the
``mowe`` router: combined data-independent + data-dependent scorer, top-1 weighted by P, balance
loss weight 1 so that the mixture's ``aux_loss_weight`` 0.1 is the whole MoWE weight). The routing records (``routing["mowe"]`` for a one-router fusion,
``mowe/<router>`` for several: per sample, which weak encoders ran and their weights) go into the
encoder output.

A frozen encoder (no parameter requires a gradient: MoWE freezes the base and the weak pool) runs
in eval mode without autograd, and its per-clip features come from a bounded LRU cache keyed by
the waveform and the weights' version (``feature_cache_mb``, :mod:`audiomoe.encoders.cache`): from
the second epoch on, a frozen encoder's forward runs only for clips it has not seen.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.interfaces import Encoder, EncoderOutput, Router
from audiomoe.core.specs import ComponentSpec, Params, Slot
from audiomoe.encoders.align import align_time
from audiomoe.encoders.cache import FeatureCache, is_frozen, run_frozen
from audiomoe.encoders.features import prepare_waveforms, resample
from audiomoe.encoders.hf_common import MissingPretrainedError


class MoWEMixture(Encoder):
    """Base encoder + sparsely routed weak encoders, fused by the fusion component."""

    accepts_task_ids = True

    class Params(Params):
        base: Annotated[ComponentSpec, Slot("encoder")] = Field(
            default_factory=lambda: ComponentSpec(name="whisper"), description="the strong base encoder"
        )
        weak: Annotated[list[ComponentSpec], Slot("encoder")] = Field(
            default_factory=lambda: [
                ComponentSpec(name="whisper", params={"window": "trim"}),
                ComponentSpec(name="hubert"),
            ],
            min_length=1,
            description="the pool of weak encoders the router picks from",
        )
        fusion: Annotated[ComponentSpec, Slot("fusion")] = Field(
            default_factory=lambda: ComponentSpec(
                name="concat", params={"router": {"name": "mowe", "params": {"balance_weight": 1.0}}}
            ),
            description="how weak features join the base features; holds the router(s) that pick them",
        )
        align: Literal["interpolate", "pool"] = Field(
            "interpolate", description="how weak frames are resampled to the base frame rate"
        )
        proj_dim: Optional[int] = Field(
            None, ge=1, le=65536, description="common width C of projected weak features (None = base width)"
        )
        aux_loss_weight: float = Field(
            0.1, ge=0.0, le=100.0, description="multiplies the router's aux losses (MoWE: 0.1)"
        )
        feature_cache_mb: float = Field(
            256.0,
            ge=0.0,
            le=1e6,
            description="LRU budget (MiB) of the frozen encoders' per-clip feature cache (0: off; encoders/cache.py)",
        )

    def __init__(
        self, params: Params, *, base: Any, weak: Any, fusion: Any, task_names: Optional[list[str]] = None
    ) -> None:
        super().__init__(params)
        p = self.params
        missing: list[str] = []
        built: list[Optional[Encoder]] = []
        for b in [base, *weak]:  # build all, so one error can name every missing checkpoint
            try:
                built.append(b())
            except MissingPretrainedError as exc:
                where = getattr(getattr(b, "node", None), "path", "")
                missing.append(f"{where}: {exc}" if where else str(exc))
                built.append(None)
        if missing:
            raise MissingPretrainedError(
                f"mowe_mixture: {len(missing)} of {len(built)} encoders have no local weights:\n  - "
                + "\n  - ".join(missing)
            )
        self.base = built[0]
        self.weak = nn.ModuleList(built[1:])
        d_base = int(self.base.output_dim)
        c = p.proj_dim or d_base
        self.fusion = fusion(d_base=d_base, weak_dim=c, num_weak=len(self.weak), task_names=list(task_names or []))
        self.proj = nn.ModuleList(nn.Linear(int(e.output_dim), c) for e in self.weak)
        self.sample_rate = int(self.base.sample_rate)
        self.frame_rate = float(self.base.frame_rate)
        self.output_dim = int(self.fusion.output_dim)
        self.feature_cache = FeatureCache(int(p.feature_cache_mb * 2**20))
        self._last_selected: Optional[list[int]] = None
        self._last_use: Optional[list[float]] = None  # share of valid samples that ran each weak encoder

    def idle_children(self) -> list[str]:
        """Weak encoders (and their projections) no sample selected in the last forward."""
        if self._last_selected is None:
            return []
        return [
            f"{part}.{k}" for k in range(len(self.weak)) if k not in self._last_selected for part in ("weak", "proj")
        ]

    def num_active_parameters(self) -> float:
        """Base + fusion (with its routers) + projections, plus the weak encoders an average sample ran (measured last forward).

        Before any forward: the router's ``k`` weak encoders of average size (or all of them).
        """
        count = lambda m: sum(p.numel() for p in m.parameters())
        weak = [count(e) + count(p) for e, p in zip(self.weak, self.proj)]
        fixed = count(self) - sum(weak)
        if self._last_use is not None:
            return fixed + sum(w * u for w, u in zip(weak, self._last_use))
        # the fusion owns the router(s); with several (MoWE's two-router form) each picks its own k
        ks = [r.k for r in self.fusion.modules() if isinstance(r, Router) and getattr(r, "k", None)]
        k = sum(ks) if ks else len(self.weak)
        return fixed + sum(weak) * min(float(k), len(self.weak)) / len(self.weak)

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames: the base encoder's (fused features stay at the base frame rate)."""
        return self.base.num_frames(lengths)

    def _encode(self, slot: str, enc: Encoder, wav: torch.Tensor, lengths: torch.Tensor, sr: int) -> EncoderOutput:
        """One encoder's output; a frozen one runs in eval mode without autograd, served from the feature cache."""
        if not is_frozen(enc):
            return enc(wav, lengths)
        if self.feature_cache.usable(slot, enc):
            return self.feature_cache.encode(slot, enc, wav, lengths, sr)
        return run_frozen(enc, wav, lengths)

    def forward(
        self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> EncoderOutput:
        """Encode ``waveforms`` [B, T] at the base sample rate; ``task_ids`` [B] go to the router."""
        p = self.params
        dev = self.proj[0].weight.device
        x, lengths = prepare_waveforms(waveforms, lengths, dev)
        base = self._encode("base", self.base, x, lengths, self.sample_rate)
        hb, pad = base.features, base.padding_mask
        b, n, _ = hb.shape
        valid = ~pad
        routings = self.fusion.route(hb, valid, task_ids)
        aux: dict = {}
        records: dict = {}
        for name, r in routings.items():
            records["mowe" + (f"/{name}" if name else "")] = r
            aux.update(
                {"router/" + (f"{name}/" if name else "") + k: p.aux_loss_weight * v for k, v in r.aux_losses.items()}
            )
        aux.update({f"base/{k}": v for k, v in base.aux_losses.items()})
        records.update({f"base/{k}": v for k, v in base.routing.items()})
        mask = torch.stack([r.mask for r in routings.values()]).any(0)  # run the union of every router's picks
        selected = mask.any(0).nonzero().flatten().tolist()
        self._last_selected = selected
        n_items = max(int(valid.any(1).sum()), 1)
        self._last_use = [float(mask[:, k].sum()) / n_items for k in range(len(self.weak))]
        weak_feats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for k in selected:
            enc = self.weak[k]
            idx = mask[:, k].nonzero().flatten()
            lk = lengths[idx]
            wav = x[idx, : max(int(lk.max()), 1)]
            if enc.sample_rate != self.sample_rate:
                wav, lk = resample(wav, lk, self.sample_rate, int(enc.sample_rate))
            out = self._encode(f"weak{k}", enc, wav, lk, int(enc.sample_rate))
            feats = align_time(
                out.features, (~out.padding_mask).sum(1), enc.frame_rate, self.base.frame_rate, n, p.align
            )
            weak_feats[k] = (idx, self.proj[k](feats) * valid[idx, :, None])
            aux.update({f"weak{k}/{name}": v for name, v in out.aux_losses.items()})
            records.update({f"weak{k}/{name}": v for name, v in out.routing.items()})
        h = self.fusion(hb, weak_feats, routings).masked_fill(pad[..., None], 0.0)
        return EncoderOutput(h, pad, aux, records)
