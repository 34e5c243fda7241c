"""Codec-token generation head with its own decoder (UniMoE-Audio's output layout; standalone form).

The audio features condition a small causal decoder of the head's own that predicts ``K``
codebooks per frame at once (UniMoE-Audio: "a multi-head output layer", no depth transformer); the
frame layout, delay pattern, loss and sampling are :mod:`audiomoe.heads.codec_frames`'. For a model
whose tasks share one decoder (UniMoE-Audio itself), use the ``codec`` head, a thin reader of the
shared backbone with a KV cache; this one suits a codec task beside heads that need no decoder.

Sequence: ``[cond-bos] [features of valid frames] [bos frame] [delayed frames ...]`` under one
causal mask, with positions counted over real tokens. The decoder is a built-in pre-norm causal
Transformer, or any registered backbone (``decoder: moe_transformer`` for MoE FFNs, top-p with
shared and null experts) whose ``forward(x, padding_mask, causal=True)`` accepts ``causal``; the
decoder's auxiliary (router) losses and routing records come back beside the task loss (a
:class:`~audiomoe.core.interfaces.TaskLoss`), so the model reports them under ``aux/heads/...``
and ``heads/<task>/...`` unscaled by ``loss_weight``. Generation runs in eval mode (no router
jitter, no dropout) and never moves a schedule. No KV cache: generation re-runs
the decoder on the prefix each frame (fine for short clips; the ``codec`` head has a KV cache).

Targets, per item: codes ``[K, T]`` (nested lists or a long tensor), ``T >= 1``, each code below
its codebook's size. Predictions: one ``[K, T_i]`` long tensor per item (the codec decodes them).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Head, TaskLoss
from audiomoe.core.specs import ComponentSpec, Slot
from audiomoe.heads.codec_frames import CodecFrameParams, CodecFrames, CodecTargets
from audiomoe.heads.functional import generation

__all__ = ["CodecCondition", "CodecGeneration", "CodecTargets"]


@dataclass
class CodecCondition:
    """Conditioning prefix: ``memory`` [B, N+1, D] (cond-bos + projected features) and its ``padding_mask``."""

    memory: torch.Tensor
    padding_mask: torch.Tensor


class CodecGeneration(CodecFrames, Head):
    """Causal decoder over delayed multi-codebook codec frames, conditioned on the audio features."""

    predicts_cheaply = False  # predictions sample autoregressively: AudioModel.forward(predict=False) skips them

    class Params(CodecFrameParams):
        num_layers: int = Field(2, ge=1, le=128, description="built-in decoder layers")
        num_heads: int = Field(4, ge=1, le=128, description="built-in decoder attention heads (divide d_model)")
        ffn_mult: int = Field(4, ge=1, le=16, description="built-in decoder FFN width = ffn_mult * d_model")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="built-in decoder dropout")
        max_positions: int = Field(1024, ge=8, le=65536, description="longest conditioning + codec sequence")
        decoder: Annotated[Optional[ComponentSpec], Slot("backbone")] = Field(
            None,
            description="a registered backbone used causally instead of the built-in decoder (e.g. moe_transformer)",
        )

    def __init__(self, params: Params, *, d_model: int, decoder: Any = None) -> None:
        super().__init__(params)
        p = self.params
        self.cond_proj = nn.Linear(d_model, d_model)
        self.cond_bos = nn.Parameter(torch.zeros(d_model))
        self._setup_frames(p, d_model)
        self.pos = nn.Embedding(p.max_positions, d_model)
        if decoder is not None:
            self.decoder = decoder(d_model=d_model)
            if "causal" not in inspect.signature(self.decoder.forward).parameters:
                raise AudioMoEError(
                    f"decoder '{getattr(decoder, 'name', decoder)}' cannot run causally: its forward(x, padding_mask) has no "
                    "'causal' argument; the codec head needs a causal decoder (leave decoder unset for the built-in one)"
                )
        else:
            if d_model % p.num_heads:
                raise AudioMoEError(f"codec decoder num_heads={p.num_heads} must divide d_model={d_model}")
            layer = nn.TransformerEncoderLayer(
                d_model,
                p.num_heads,
                p.ffn_mult * d_model,
                p.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.decoder = nn.TransformerEncoder(
                layer, p.num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
            )

    # -- decoder --------------------------------------------------------------------------------

    def _decode(
        self, cond: CodecCondition, frames: torch.Tensor, frame_pad: torch.Tensor
    ) -> tuple[torch.Tensor, dict, dict]:
        """Logits [B, S, K, V] for codec input frames [B, S, K] after the prefix, aux losses, routing records."""
        x = torch.cat([cond.memory, self.embed_frames(frames)], 1)
        pad = torch.cat([cond.padding_mask, frame_pad], 1)
        if x.shape[1] > self.params.max_positions:
            raise AudioMoEError(
                f"conditioning ({cond.memory.shape[1]}) + codec frames ({frames.shape[1]}) = {x.shape[1]} positions exceed "
                f"max_positions={self.params.max_positions}; raise it or shorten the clips"
            )
        pos = ((~pad).long().cumsum(1) - 1).clamp_min(0)
        x = x + self.pos(pos)
        aux: dict = {}
        routing: dict = {}
        if isinstance(self.decoder, nn.TransformerEncoder):
            causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
            h = self.decoder(x, mask=causal, src_key_padding_mask=pad, is_causal=True)
        else:
            out = self.decoder(x, pad, causal=True)
            h, aux, routing = out.hidden, out.aux_losses, out.routing
        return self.frame_logits(h[:, cond.memory.shape[1] :]), aux, routing

    # -- Task -----------------------------------------------------------------------------------

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> CodecCondition:
        """The conditioning prefix: a learned start vector, then the projected valid features."""
        b = features.shape[0]
        mem = torch.cat([self.cond_bos.expand(b, 1, -1), self.cond_proj(features)], 1)
        pad = torch.cat([padding_mask.new_zeros(b, 1), padding_mask], 1)
        return CodecCondition(mem, pad)

    def loss(self, outputs: CodecCondition, targets: CodecTargets) -> torch.Tensor:
        """Sum over codebooks of the cross-entropy over that codebook's scored frames (+ decoder aux losses)."""
        terms = self.loss_terms(outputs, targets)
        return terms.loss + sum(terms.aux_losses.values(), terms.loss.new_zeros(()))

    def loss_terms(self, outputs: CodecCondition, targets: CodecTargets) -> TaskLoss:
        """The cross-entropy term, and the decoder's aux losses and routing records beside it."""
        logits, aux, routing = self._decode(outputs, targets.inputs, targets.padding_mask)
        total = self.frames_loss(logits, targets)
        # the decoder's router losses are not task loss: they must not be scaled by loss_weight
        return TaskLoss(
            total, {f"decoder/{k}": v for k, v in aux.items()}, {f"decoder/{k}": v for k, v in routing.items()}
        )

    @generation
    def generate(self, outputs: CodecCondition, **sampling: Any) -> list[torch.Tensor]:
        """Sample codes [K, T_i] per item, frame by frame (re-running the decoder on the prefix each frame).

        ``sampling``: ``temperature``, ``top_k``, ``top_p``, ``max_frames``, ``generator`` (default: params).
        """

        def step(frames: torch.Tensor) -> torch.Tensor:
            pad = torch.zeros(frames.shape[:2], dtype=torch.bool, device=frames.device)
            return self._decode(outputs, frames, pad)[0][:, -1]

        return self.sample_frames(step, outputs.memory.shape[0], outputs.memory.device, self.params, **sampling)

    def predict(self, outputs: CodecCondition) -> list[torch.Tensor]:
        """Sampled codes [K, T_i] per item (temperature / top-k / top-p from params)."""
        return self.generate(outputs)
