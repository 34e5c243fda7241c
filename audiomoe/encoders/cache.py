"""A feature cache for frozen encoders (MoWE-Audio's frozen weak pool; issue 26), keyed by the waveform.

MoWE-Audio keeps its encoders frozen while the routers, projections and adapter train, so a frozen
encoder computes the same features for a clip at every epoch. :class:`FeatureCache` stores each
clip's features once and serves them afterwards:

    key(clip)  = (encoder slot, weights version, blake2b(samples[:length]), length, sample rate)
    version    = ((data_ptr, _version) of every parameter and buffer)   torch bumps ``_version`` on
                 every in-place write (optimizer step, ``copy_``, ``load_state_dict``), so new
                 weights never meet old features
    value      = the clip's valid frames [n_i, D] (padding trimmed), evicted least-recently-used
                 beyond ``max_bytes``

It is used only for an encoder none of whose parameters requires a gradient (checked at every
call, so a stage that unfreezes the encoder bypasses it) and whose output carries no aux loss and
no routing record. A frozen encoder runs in eval mode under ``no_grad`` (no dropout) and encodes
each clip it misses *alone*: an encoder whose valid frames see a batch's padding (Whisper trimmed to
the longest clip, HuBERT-base without an attention mask) would otherwise give a clip features that
depend on the batch it first came in, so training, the final score and a later ``measure`` in a new
process would see different features. A served batch is padded to its longest clip's valid frames.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Hashable, Optional

import torch
from torch import nn

from audiomoe.core.interfaces import EncoderOutput
from audiomoe.encoders.features import frames_mask


def is_frozen(module: nn.Module) -> bool:
    """True when ``module`` has parameters and none of them requires a gradient."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def weights_version(module: nn.Module) -> tuple:
    """A value that changes whenever any parameter or buffer of ``module`` is replaced or written in place."""
    return tuple((t.data_ptr(), t._version) for t in [*module.parameters(), *module.buffers()])


def clip_key(wave: torch.Tensor, length: int, sample_rate: int) -> tuple:
    """``(digest of the valid samples, length, sample rate)``: the identity of one clip."""
    data = wave[:length].detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return (hashlib.blake2b(data, digest_size=16).hexdigest(), int(length), int(sample_rate))


def run_frozen(
    encoder: nn.Module, wav: torch.Tensor, lengths: torch.Tensor, run: Optional[Callable] = None
) -> EncoderOutput:
    """A frozen encoder's forward: eval mode (no dropout), no autograd graph; its training mode is restored."""
    was = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return (run or encoder)(wav, lengths)
    finally:
        encoder.train(was)


class FeatureCache:
    """LRU map clip -> features [n_i, D] of frozen encoders, bounded by ``max_bytes`` (module doc)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: "OrderedDict[Hashable, torch.Tensor]" = OrderedDict()
        self._uncacheable: set[Hashable] = set()  # encoder slots whose output has aux losses / routing records

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._items.clear()
        self.bytes = 0

    def _put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()

    def usable(self, slot: Hashable, encoder: nn.Module) -> bool:
        """Whether ``encoder`` (in ``slot``) may be served from the cache now: frozen, cache on, not ruled out."""
        return self.max_bytes > 0 and slot not in self._uncacheable and is_frozen(encoder)

    def encode(
        self,
        slot: Hashable,
        encoder: nn.Module,
        wav: torch.Tensor,
        lengths: torch.Tensor,
        sample_rate: int,
        run: Optional[Callable[[torch.Tensor, torch.Tensor], EncoderOutput]] = None,
    ) -> EncoderOutput:
        """``encoder(wav, lengths)`` for a frozen encoder, computing only the clips not cached (eval mode, no grad)."""
        run = run or encoder
        version = weights_version(encoder)
        keys = [(slot, version, *clip_key(wav[i], int(lengths[i]), sample_rate)) for i in range(wav.shape[0])]
        feats: list[Optional[torch.Tensor]] = []
        for k in keys:
            hit = self._items.get(k)
            if hit is not None:
                self._items.move_to_end(k)
            feats.append(hit)
        missing = [i for i, f in enumerate(feats) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for i in missing:  # one clip at a time: its features then never depend on the batch it came in (padding)
            n = max(int(lengths[i]), 1)
            out = run_frozen(encoder, wav[i : i + 1, :n], lengths[i : i + 1], run)
            if out.aux_losses or out.routing:  # its extra outputs cannot be replayed: never cache this slot again
                self._uncacheable.add(slot)
                return run_frozen(encoder, wav, lengths, run)
            count = int((~out.padding_mask[0]).sum())
            feats[i] = out.features[0, :count].detach().clone()
            self._put(keys[i], feats[i])
        return self._assemble(feats)  # type: ignore[arg-type]  # every slot is filled above

    @staticmethod
    def _assemble(feats: list[torch.Tensor]) -> EncoderOutput:
        n = torch.tensor([f.shape[0] for f in feats], device=feats[0].device)
        width = max(int(n.max()), 1)
        batch = feats[0].new_zeros(len(feats), width, feats[0].shape[-1])
        for i, f in enumerate(feats):
            batch[i, : f.shape[0]] = f
        return EncoderOutput(batch, frames_mask(n, width))
