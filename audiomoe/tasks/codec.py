"""Codec-token generation head (UniMoE-Audio's output): multi-codebook audio tokens with a delay pattern.

The audio features condition a causal decoder that predicts ``K`` codebooks per frame at once
(UniMoE-Audio: "a multi-head output layer", no depth transformer). Codebook ``k`` is delayed by
``delays[k]`` frames (MusicGen; UniMoE-Audio uses 12 DAC codebooks with delays
``[0, 8, 9, ..., 18]``). Input embedding of a frame = the sum over codebooks of per-codebook
embeddings; output = one linear layer to ``K x V`` logits, ``V = max(codebook_size) + 3``
(codes, then eos, pad, bos, as UniMoE's 1024 + 3). Loss, as UniMoE-Audio's code:
``L = sum_k CE_k`` over the frames where codebook ``k`` has a real code (and, for the lead
codebook, the eos frame). Sampling: temperature / top-k / top-p per codebook, restricted to that
codebook's own vocabulary; the lead codebook (smallest delay) decides where the clip ends, the
others get their eos forced ``delays[k]`` frames later, as the pattern dictates.

Sequence: ``[cond-bos] [features of valid frames] [bos frame] [delayed frames ...]`` under one
causal mask, with positions counted over real tokens. The decoder is a built-in pre-norm causal
Transformer, or any registered backbone (``decoder: moe_transformer`` for MoE FFNs, top-p with
shared and null experts) whose ``forward(x, padding_mask, causal=True)`` accepts ``causal``; the
decoder's auxiliary (router) losses and routing records come back beside the task loss (a
:class:`~audiomoe.core.interfaces.TaskLoss`), so the model reports them under ``aux/heads/...``
and ``heads/<task>/...`` unscaled by ``loss_weight``. Generation runs in eval mode (no router
jitter, no dropout) and never moves a schedule. No KV cache: generation re-runs
the decoder on the prefix each frame (fine for short clips; a cache is future work).

Targets, per item: codes ``[K, T]`` (nested lists or a long tensor), ``T >= 1``, each code below
its codebook's size. Predictions: one ``[K, T_i]`` long tensor per item (the codec decodes them).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Any, Mapping, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Task, TaskLoss
from audiomoe.core.specs import ComponentSpec, Params, Slot
from audiomoe.tasks.functional import apply_delay_pattern, generation, revert_delay_pattern, sample_logits


@dataclass
class CodecCondition:
    """Conditioning prefix: ``memory`` [B, N+1, D] (cond-bos + projected features) and its ``padding_mask``."""

    memory: torch.Tensor
    padding_mask: torch.Tensor


@dataclass
class CodecTargets:
    """Teacher forcing: ``inputs``/``labels`` [B, S, K] (labels -100 where not scored), frame ``padding_mask`` [B, S], ``codes``."""

    inputs: torch.Tensor
    labels: torch.Tensor
    padding_mask: torch.Tensor
    codes: list[torch.Tensor]


class CodecGeneration(Task):
    """Causal decoder over delayed multi-codebook codec frames, conditioned on the audio features."""

    predicts_cheaply = False  # predictions sample autoregressively: AudioModel.forward(predict=False) skips them

    class Params(Params):
        num_codebooks: int = Field(4, ge=1, le=64, description="codebooks per frame (DAC 16 kHz: 12)")
        codebook_size: int | list[int] = Field(64, description="codes per codebook (one value for all, or one per codebook)")
        delays: Optional[list[int]] = Field(None, description="delay per codebook in frames; default 0, 1, ..., K-1")
        num_layers: int = Field(2, ge=1, le=128, description="built-in decoder layers")
        num_heads: int = Field(4, ge=1, le=128, description="built-in decoder attention heads (divide d_model)")
        ffn_mult: int = Field(4, ge=1, le=16, description="built-in decoder FFN width = ffn_mult * d_model")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="built-in decoder dropout")
        max_positions: int = Field(1024, ge=8, le=65536, description="longest conditioning + codec sequence")
        max_frames: int = Field(64, ge=1, le=65536, description="generation: most codec frames per clip")
        min_frames: int = Field(1, ge=1, le=65536, description="generation: eos is not allowed before this many frames")
        temperature: float = Field(1.0, ge=0.0, le=100.0, description="sampling temperature (0: arg-max)")
        top_k: int = Field(0, ge=0, le=65536, description="keep the k most likely codes (0: off)")
        top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1: off)")
        decoder: Annotated[Optional[ComponentSpec], Slot("backbone")] = Field(
            None, description="a registered backbone used causally instead of the built-in decoder (e.g. moe_transformer)"
        )
        loss_weight: float = Field(1.0, ge=0.0, le=1000.0, description="weight of this head's loss in the total loss")

        @model_validator(mode="after")
        def _shapes(self) -> "CodecGeneration.Params":
            k = self.num_codebooks
            sizes = self.codebook_size if isinstance(self.codebook_size, list) else [self.codebook_size]
            if isinstance(self.codebook_size, list) and len(sizes) != k:
                raise ValueError(f"codebook_size has {len(sizes)} entries but num_codebooks is {k}")
            if any(s < 2 or s > 1_000_000 for s in sizes):
                raise ValueError(f"codebook sizes must be in [2, 1000000], got {sizes}")
            if self.delays is not None:
                if len(self.delays) != k:
                    raise ValueError(f"delays has {len(self.delays)} entries but num_codebooks is {k}")
                if any(d < 0 or d > 1024 for d in self.delays):
                    raise ValueError(f"delays must be in [0, 1024], got {self.delays}")
            if self.min_frames > self.max_frames:
                raise ValueError(f"min_frames ({self.min_frames}) must not exceed max_frames ({self.max_frames})")
            return self

    def __init__(self, params: Params, *, d_model: int, decoder: Any = None) -> None:
        super().__init__(params)
        p = self.params
        self.loss_weight = p.loss_weight
        k = p.num_codebooks
        self.sizes = list(p.codebook_size) if isinstance(p.codebook_size, list) else [p.codebook_size] * k
        self.delays = list(p.delays) if p.delays is not None else list(range(k))
        self.lead = min(range(k), key=lambda i: (self.delays[i], i))
        top = max(self.sizes)
        self.eos, self.pad, self.bos = top, top + 1, top + 2
        self.vocab = top + 3
        self.cond_proj = nn.Linear(d_model, d_model)
        self.cond_bos = nn.Parameter(torch.zeros(d_model))
        self.embed = nn.ModuleList(nn.Embedding(self.vocab, d_model) for _ in range(k))
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
                d_model, p.num_heads, p.ffn_mult * d_model, p.dropout, activation="gelu", batch_first=True, norm_first=True
            )
            self.decoder = nn.TransformerEncoder(layer, p.num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.out = nn.Linear(d_model, k * self.vocab)
        allowed = torch.zeros(k, self.vocab, dtype=torch.bool)  # ids each codebook may emit
        for i, s in enumerate(self.sizes):
            allowed[i, :s] = True
        allowed[self.lead, self.eos] = True
        self.register_buffer("allowed", allowed, persistent=False)

    # -- decoder --------------------------------------------------------------------------------

    def _decode(self, cond: CodecCondition, frames: torch.Tensor, frame_pad: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """Logits [B, S, K, V] for codec input frames [B, S, K] after the prefix, aux losses, routing records."""
        x = torch.cat([cond.memory, sum(e(frames[..., i]) for i, e in enumerate(self.embed))], 1)
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
        h = h[:, cond.memory.shape[1] :]
        logits = self.out(h).view(*h.shape[:2], len(self.sizes), self.vocab)
        return logits.masked_fill(~self.allowed, float("-inf")), aux, routing

    # -- Task -----------------------------------------------------------------------------------

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> CodecCondition:
        """The conditioning prefix: a learned start vector, then the projected valid features."""
        b = features.shape[0]
        mem = torch.cat([self.cond_bos.expand(b, 1, -1), self.cond_proj(features)], 1)
        pad = torch.cat([padding_mask.new_zeros(b, 1), padding_mask], 1)
        return CodecCondition(mem, pad)

    def make_targets(self, raw: list[Any], device: torch.device) -> CodecTargets:
        """Codes [K, T] per item -> delayed teacher-forcing inputs and labels; checks every codebook's range."""
        k = len(self.sizes)
        codes = []
        for i, item in enumerate(raw):
            c = torch.as_tensor(item, dtype=torch.long)
            if c.dim() != 2 or c.shape[0] != k:
                raise AudioMoEError(f"codec target of item {i} must be [num_codebooks={k}, frames], got shape {tuple(c.shape)}")
            if c.shape[1] == 0:
                raise AudioMoEError(f"codec target of item {i} is empty (0 frames)")
            for j, s in enumerate(self.sizes):
                bad = (c[j] < 0) | (c[j] >= s)
                if bad.any():
                    raise AudioMoEError(
                        f"codec target of item {i}: code {int(c[j][bad][0])} in codebook {j} is outside its vocabulary [0, {s})"
                    )
            codes.append(c)
        lengths = torch.tensor([c.shape[1] for c in codes])
        padded = torch.full((len(codes), k, int(lengths.max())), self.pad, dtype=torch.long)
        for i, c in enumerate(codes):
            padded[i, :, : c.shape[1]] = c
        delayed = apply_delay_pattern(padded, lengths, self.delays, bos=self.bos, eos=self.eos, pad=self.pad)
        delayed = delayed.transpose(1, 2)  # [B, S, K]
        start = torch.full_like(delayed[:, :1], self.bos)
        inputs = torch.cat([start, delayed[:, :-1]], 1)
        labels = delayed.clone()
        scored = labels < max(self.sizes)
        scored[..., self.lead] |= labels[..., self.lead] == self.eos
        labels[~scored] = -100
        frame_pad = (inputs == self.pad).all(-1)
        return CodecTargets(inputs.to(device), labels.to(device), frame_pad.to(device), [c.to(device) for c in codes])

    def example_targets(self, n: int) -> list[list[list[int]]]:
        """``n`` short valid code sequences."""
        return [[[(i + j + t) % s for t in range(2 + i % 2)] for j, s in enumerate(self.sizes)] for i in range(n)]

    def loss(self, outputs: CodecCondition, targets: CodecTargets) -> torch.Tensor:
        """Sum over codebooks of the cross-entropy over that codebook's scored frames (+ decoder aux losses)."""
        terms = self.loss_terms(outputs, targets)
        return terms.loss + sum(terms.aux_losses.values(), terms.loss.new_zeros(()))

    def loss_terms(self, outputs: CodecCondition, targets: CodecTargets) -> TaskLoss:
        """The cross-entropy term, and the decoder's aux losses and routing records beside it."""
        logits, aux, routing = self._decode(outputs, targets.inputs, targets.padding_mask)
        total = logits.new_zeros(())
        for j in range(len(self.sizes)):
            lab = targets.labels[..., j]
            if (lab != -100).any():  # a codebook with nothing to score (all delayed past the end) is skipped
                total = total + nn.functional.cross_entropy(logits[..., j, :].reshape(-1, self.vocab), lab.reshape(-1), ignore_index=-100)
        # the decoder's router losses are not task loss: they must not be scaled by loss_weight
        return TaskLoss(total, {f"decoder/{k}": v for k, v in aux.items()}, {f"decoder/{k}": v for k, v in routing.items()})

    @generation
    def generate(
        self, outputs: CodecCondition, *, temperature: Optional[float] = None, top_k: Optional[int] = None,
        top_p: Optional[float] = None, max_frames: Optional[int] = None, generator: Optional[torch.Generator] = None,
    ) -> list[torch.Tensor]:
        """Sample codes [K, T_i] per item, frame by frame, following the delay pattern."""
        p = self.params
        temperature = p.temperature if temperature is None else temperature
        top_k, top_p = (p.top_k if top_k is None else top_k), (p.top_p if top_p is None else top_p)
        max_frames = p.max_frames if max_frames is None else max_frames
        b, k = outputs.memory.shape[0], len(self.sizes)
        dev = outputs.memory.device
        d = torch.tensor(self.delays, device=dev)
        frames = torch.full((b, 1, k), self.bos, dtype=torch.long, device=dev)
        ends = torch.full((b,), -1, dtype=torch.long, device=dev)  # clip length T once the lead codebook emits eos
        out_frames = []
        for step in range(max_frames + max(self.delays) + 1):
            logits, _, _ = self._decode(outputs, frames, torch.zeros(frames.shape[:2], dtype=torch.bool, device=dev))
            last = logits[:, -1].clone()  # [B, K, V]
            t = step - d  # the real frame index each codebook is at
            if step - self.delays[self.lead] < p.min_frames:
                last[:, self.lead, self.eos] = float("-inf")
            nxt = sample_logits(last.reshape(b * k, -1), temperature, top_k, top_p, generator).view(b, k)
            if step - self.delays[self.lead] >= max_frames:
                nxt[:, self.lead] = self.eos
            nxt = torch.where(t.view(1, k) < 0, torch.full_like(nxt, self.bos), nxt)
            newly = (ends < 0) & (nxt[:, self.lead] == self.eos) & (t[self.lead] >= 0)
            ends = torch.where(newly, t[self.lead].expand(b), ends)
            done = ends >= 0
            rel = t.view(1, k) - ends.view(b, 1)
            nxt = torch.where(done.view(b, 1) & (rel == 0), torch.full_like(nxt, self.eos), nxt)
            nxt = torch.where(done.view(b, 1) & (rel > 0), torch.full_like(nxt, self.pad), nxt)
            out_frames.append(nxt)
            frames = torch.cat([frames, nxt[:, None]], 1)
            if bool(done.all()) and bool((rel >= 0).all()):
                break
        delayed = torch.stack(out_frames, 2)  # [B, K, S]
        lengths = ends.clamp_min(0)
        codes = revert_delay_pattern(delayed, lengths, self.delays, pad=self.pad)
        return [codes[i, :, : int(lengths[i])] for i in range(b)]

    def predict(self, outputs: CodecCondition) -> list[torch.Tensor]:
        """Sampled codes [K, T_i] per item (temperature / top-k / top-p from params)."""
        return self.generate(outputs)

    def metrics(self, predictions: list[torch.Tensor], targets: CodecTargets) -> Mapping[str, float]:
        """``code_accuracy``: matching codes over the longer of each pair; ``length_error``: mean |T_pred - T|."""
        hit = total = 0
        diffs = []
        for pred, ref in zip(predictions, targets.codes):
            n = min(pred.shape[1], ref.shape[1])
            hit += int((pred[:, :n] == ref[:, :n].to(pred.device)).sum())
            total += ref.shape[0] * max(pred.shape[1], ref.shape[1])
            diffs.append(abs(pred.shape[1] - ref.shape[1]))
        return {"code_accuracy": hit / max(total, 1), "length_error": float(sum(diffs)) / max(len(diffs), 1)}
