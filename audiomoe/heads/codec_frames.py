"""Multi-codebook codec frames with a delay pattern: what both codec heads share (not a component).

UniMoE-Audio writes speech and music as ``K`` codec codebooks per frame, codebook ``k`` delayed by
``delays[k]`` frames (MusicGen; UniMoE-Audio: 12 DAC codebooks, delays ``[0, 8, 9, ..., 18]``). A
frame goes in as the sum of per-codebook embeddings and comes out of one linear layer as ``K x V``
logits, ``V = max(codebook_size) + 3`` (codes, then eos, pad, bos: UniMoE's 1024 + 3). Loss, as
UniMoE-Audio's code: ``L = sum_k CE_k`` over the frames where codebook ``k`` has a real code (and,
for the lead codebook, its eos). Sampling: temperature / top-k / top-p per codebook, restricted to
that codebook's own vocabulary; the lead codebook (smallest delay) decides where the clip ends, the
others get their eos ``delays[k]`` frames later, as the pattern dictates.

:class:`CodecFrames` holds this once; ``codec`` (a thin reader of the shared backbone, KV-cached)
and ``codec_generation`` (its own small decoder) differ only in what runs between embedding and logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.specs import ComponentSpec, Params
from audiomoe.heads.functional import apply_delay_pattern, revert_delay_pattern, sample_logits


class CodecFrameParams(Params):
    """Codebook layout, delays and sampling: the knobs both codec heads declare through this class."""

    num_codebooks: int = Field(4, ge=1, le=64, description="codebooks per frame (DAC 16 kHz: 12)")
    codebook_size: int | list[int] = Field(
        64, description="codes per codebook (one value for all, or one per codebook)"
    )
    delays: Optional[list[int]] = Field(None, description="delay per codebook in frames; default 0, 1, ..., K-1")
    max_frames: int = Field(64, ge=1, le=65536, description="generation: most codec frames per clip")
    min_frames: int = Field(1, ge=1, le=65536, description="generation: eos is not allowed before this many frames")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="sampling temperature (0: arg-max)")
    top_k: int = Field(0, ge=0, le=65536, description="keep the k most likely codes (0: off)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1: off)")
    loss_weight: float = Field(1.0, ge=0.0, le=1000.0, description="weight of this head's loss in the total loss")
    out_bias: bool = Field(True, description="the K x V output layer has a bias (UniMoE-Audio's codec_head has none)")
    codec: Optional[ComponentSpec] = Field(
        None,
        description="the codec the codes are in (e.g. {name: dac, params: {pretrained: DIR}}): the built-in corpus's "
        "codes are made with it, predict / eval decode with it; None = mel_rvq fitted on the corpus for this layout",
    )

    @model_validator(mode="after")
    def _shapes(self) -> "CodecFrameParams":
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


@dataclass
class CodecTargets:
    """Teacher forcing: ``inputs``/``labels`` [B, S, K] (labels -100 where not scored), frame ``padding_mask`` [B, S], ``codes``."""

    inputs: torch.Tensor
    labels: torch.Tensor
    padding_mask: torch.Tensor
    codes: list[torch.Tensor]


class CodecFrames(nn.Module):
    """Frame embeddings in, ``K x V`` logits out, targets, loss, sampling and metrics of delayed codec frames."""

    def _setup_frames(self, p: CodecFrameParams, d_model: int) -> None:
        k = p.num_codebooks
        self.loss_weight = p.loss_weight
        self.sizes = list(p.codebook_size) if isinstance(p.codebook_size, list) else [p.codebook_size] * k
        self.delays = list(p.delays) if p.delays is not None else list(range(k))
        self.lead = min(range(k), key=lambda i: (self.delays[i], i))
        top = max(self.sizes)
        self.eos, self.pad, self.bos = top, top + 1, top + 2
        self.vocab = top + 3
        self.embed = nn.ModuleList(nn.Embedding(self.vocab, d_model) for _ in range(k))
        self.out = nn.Linear(d_model, k * self.vocab, bias=p.out_bias)
        allowed = torch.zeros(k, self.vocab, dtype=torch.bool)  # ids each codebook may emit
        for i, s in enumerate(self.sizes):
            allowed[i, :s] = True
        allowed[self.lead, self.eos] = True
        self.register_buffer("allowed", allowed, persistent=False)

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Codec input frames [B, S, K] -> [B, S, D]: the sum of the per-codebook embeddings."""
        return sum(e(frames[..., i]) for i, e in enumerate(self.embed))

    def frame_embedder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`embed_frames` as one lookup in the stacked tables (built once: for a generation loop's steps)."""
        k = len(self.embed)
        table = torch.stack([e.weight for e in self.embed]).reshape(k * self.vocab, -1)
        offsets = torch.arange(k, device=table.device) * self.vocab
        return lambda frames: nn.functional.embedding(frames + offsets, table).sum(-2)

    def step_logits(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`frame_logits` of one position per row, [B, D] -> [B, K, V], built once for a generation loop.

        The output weight is transposed once (a GEMM over a contiguous [D, K*V] operand is ~3x faster
        than over the [K*V, D] weight at a decoding step's few rows) and the -inf of disallowed ids
        folded into the bias, so a step is one ``addmm``.
        """
        w = (
            self.out.weight.detach().float().t().contiguous()
        )  # in float32 whatever the model's dtype: sampling reads it
        b = self.out.bias.detach().float() if self.out.bias is not None else w.new_zeros(w.shape[1])
        bias = b.masked_fill(~self.allowed.reshape(-1), float("-inf"))
        k = len(self.sizes)
        return lambda hidden: torch.addmm(bias, hidden.float(), w).view(hidden.shape[0], k, self.vocab)

    def frame_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, S, D] -> logits [B, S, K, V], ids outside a codebook's vocabulary at -inf."""
        logits = self.out(hidden).view(*hidden.shape[:2], len(self.sizes), self.vocab)
        return logits.masked_fill(~self.allowed, float("-inf"))

    def make_targets(self, raw: list[Any], device: torch.device) -> CodecTargets:
        """Codes [K, T] per item -> delayed teacher-forcing inputs and labels; checks every codebook's range."""
        k = len(self.sizes)
        codes = []
        for i, item in enumerate(raw):
            c = torch.as_tensor(item, dtype=torch.long)
            if c.dim() != 2 or c.shape[0] != k:
                raise AudioMoEError(
                    f"codec target of item {i} must be [num_codebooks={k}, frames], got shape {tuple(c.shape)}"
                )
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

    def frames_loss(self, logits: torch.Tensor, targets: CodecTargets) -> torch.Tensor:
        """Sum over codebooks of the cross-entropy over that codebook's scored frames.

        One cross-entropy over all codebooks, then a mean per codebook: indexing one codebook at a
        time would make autograd write a zero tensor of the whole [B, S, K, V] logits per codebook.
        """
        k = len(self.sizes)
        labels = targets.labels.reshape(-1, k)
        ce = nn.functional.cross_entropy(
            logits.reshape(-1, self.vocab), labels.reshape(-1), ignore_index=-100, reduction="none"
        )
        scored = (labels != -100).sum(0)
        per_book = ce.view(-1, k).sum(0) / scored.clamp_min(1)
        return per_book[scored > 0].sum()  # a codebook with nothing to score (all delayed past the end) is skipped

    def sample_frames(
        self,
        step: Callable[[torch.Tensor], torch.Tensor],
        b: int,
        device: torch.device,
        params: CodecFrameParams,
        *,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        max_frames: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> list[torch.Tensor]:
        """Sample codes [K, T_i] per item frame by frame; ``step(frames [B, s, K])`` gives the last frame's logits [B, K, V].

        ``step`` returns a new tensor each call (this loop masks ids in it in place) and gets a view of one
        preallocated frame buffer (valid for that call). What the delay pattern fixes is decided on the host
        (which codebooks are still in their delay, whether eos is allowed or forced): a step adds a few ops to
        the decoder's and reads nothing from the device but, once a clip can have ended, whether all have.
        """
        p = params
        temperature = p.temperature if temperature is None else temperature
        top_k, top_p = (p.top_k if top_k is None else top_k), (p.top_p if top_p is None else top_p)
        max_frames = p.max_frames if max_frames is None else max_frames
        k, lead, dl, dmax = len(self.sizes), self.lead, self.delays[self.lead], max(self.delays)
        steps = max_frames + dmax + 1
        frames = torch.full((b, steps + 1, k), self.bos, dtype=torch.long, device=device)
        # a codebook still in its delay at step s writes bos: one [K] mask per such step, made once
        waiting = [torch.tensor([s < d for d in self.delays], device=device) for s in range(dmax)]
        neg_d = -torch.tensor(self.delays, device=device)
        never = torch.iinfo(torch.long).max // 2  # "no eos yet": every codebook's t - ends is then negative
        bos, eos, pad = (
            torch.tensor(i, device=device) for i in (self.bos, self.eos, self.pad)
        )  # no scalar wrap per op
        ends = torch.full((b,), never, dtype=torch.long, device=device)  # clip length T once the lead emits eos
        soonest = min(p.min_frames, max_frames)  # no clip ends before this many frames (eos masked or forced)
        s = -1
        for s in range(steps):
            last = step(frames[:, : s + 1])  # [B, K, V], a fresh tensor each step: edited in place below
            if s - dl < p.min_frames:
                last[:, lead, self.eos] = float("-inf")
            nxt = sample_logits(last.reshape(b * k, -1), temperature, top_k, top_p, generator).view(b, k)
            if s - dl >= max_frames:
                nxt[:, lead] = self.eos
            if s < dmax:
                nxt = torch.where(waiting[s], bos, nxt)
            if s >= dl:  # the lead codebook writes real frames: its eos ends the clip at T = s - dl
                ends = torch.where((ends == never) & (nxt[:, lead] == eos), s - dl, ends)
                # codebook k at frame t = s - d_k: eos at t == T, pad after (rel < 0: before T, or no eos yet)
                rel = (neg_d + s).view(1, k) - ends.view(b, 1)
                nxt = torch.where(rel >= 0, torch.where(rel > 0, pad, eos), nxt)
            frames[:, s + 1] = nxt
            # done when every clip has ended and its last delayed codebook written eos (T >= soonest: not sooner)
            if s - dmax >= soonest and bool((ends <= s - dmax).all()):
                break
        delayed = frames[:, 1 : s + 2].transpose(1, 2)  # [B, K, S]
        lengths = ends.masked_fill(ends == never, 0)
        codes = revert_delay_pattern(delayed, lengths, self.delays, pad=self.pad)
        return [codes[i, :, :n] for i, n in enumerate(lengths.tolist())]

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
