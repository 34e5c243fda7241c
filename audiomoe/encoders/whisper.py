"""Whisper's audio encoder (Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak
Supervision"), any size from tiny to large-v3, on ``transformers.WhisperEncoder``'s weights.

Pipeline, all batched on the model's device: 16 kHz mono -> log-mel (torch; equal to
``WhisperFeatureExtractor`` to 1e-4, 80 or 128 bins per the config) -> ``h0 = GELU(conv2(GELU(conv1(mel)))) + P``
(conv2 has stride 2: one frame per 320 samples, 50 Hz) -> pre-norm Transformer layers -> LayerNorm.

Window (``window``):
- ``"pad30"`` (default, like the original): every clip is zero-padded to the model's window
  (``max_source_positions * 320`` samples: 30 s for released checkpoints) and all 1500 positions
  run, attending to the padding, exactly as transformers does (parity tested to 1e-5).
- ``"trim"``: the batch is padded only to its longest clip (rounded up to 320 samples); positional
  embeddings are sliced to that length, padded mel frames and conv outputs are zeroed and
  padded keys are masked in attention, so each clip's output is the same whatever it is batched
  with. Much cheaper on short clips (see ``benchmarks/mixture.py``); the model never saw
  short windows in pre-training, so expect a small shift in features.

Audio longer than the window is never truncated: it is cut into consecutive window-long chunks
(no overlap), every chunk of the batch runs in one encoder call, and the chunks' frames are
concatenated in time. Valid frames per clip: ``ceil(L / 320)``. The output is cut to the
longest clip's valid frames; padded frames are zeroed and marked in ``padding_mask``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Encoder, EncoderOutput
from audiomoe.core.specs import Params
from audiomoe.encoders.features import frames_mask, prepare_waveforms, whisper_log_mel
from audiomoe.encoders.hf_common import (
    LayerSelect,
    check_model_type,
    freeze_,
    load_prefixed_state_dict,
    resolve_pretrained,
)

TINY_WHISPER = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_layers=1,
    decoder_attention_heads=2,
    decoder_ffn_dim=64,
    num_mel_bins=80,
    max_source_positions=1500,
)


class Whisper(Encoder):
    """Whisper encoder: waveforms [B, T] at 16 kHz -> [B, N, d_model] at 50 frames/s."""

    # softmax cancels a key bias (every logit of a query moves equally): zero gradient by construction
    gradient_exempt: ClassVar[tuple[str, ...]] = ("*.k_proj.bias",)

    class Params(Params):
        pretrained: Optional[str] = Field(
            None,
            description="local directory (HF layout) or model id in the local HF cache, e.g. openai/whisper-tiny; None = random init",
        )
        config: dict[str, Any] = Field(
            default_factory=dict,
            description="WhisperConfig overrides (random init starts from a tiny config: d_model 32, 2 layers)",
        )
        freeze: bool = Field(False, description="no gradients to the Whisper weights (kept in eval mode)")
        layer: Union[Literal["last", "weighted"], int] = Field(
            "last",
            description="'last', a hidden-state index (0 = embeddings; negative from the end) or 'weighted' (SUPERB learned sum)",
        )
        window: Literal["pad30", "trim"] = Field(
            "pad30", description="pad every clip to the 30 s window, or run on the true length"
        )

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        p = self.params
        if p.pretrained is not None:
            path = resolve_pretrained(p.pretrained, "encoder 'whisper'")
            check_model_type(path, "whisper", "encoder 'whisper'")
            cfg = WhisperConfig.from_pretrained(str(path), local_files_only=True, **p.config)
            self.model = WhisperEncoder(cfg)
            state = load_prefixed_state_dict(path, ("model.encoder.", "encoder.", ""))
            state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise AudioMoEError(
                    f"encoder 'whisper': checkpoint '{p.pretrained}' does not fit WhisperEncoder: "
                    f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
                )
        else:
            try:
                cfg = WhisperConfig(**{**TINY_WHISPER, **p.config})
            except (TypeError, ValueError) as exc:
                raise AudioMoEError(f"encoder 'whisper': bad config override {p.config}: {exc}") from exc
            self.model = WhisperEncoder(cfg)
        self.config = cfg
        self.sample_rate = 16000
        self.hop = 160
        self.stride = self.model.conv1.stride[0] * self.model.conv2.stride[0]  # mel frames per output frame
        self.samples_per_frame = self.hop * self.stride
        self.window_samples = cfg.max_source_positions * self.samples_per_frame
        self.frame_rate = self.sample_rate / self.samples_per_frame
        self.output_dim = cfg.d_model
        self.select = LayerSelect(p.layer, cfg.encoder_layers + 1)
        if p.freeze:
            freeze_(self.model)
            self.model.eval()

    def train(self, mode: bool = True) -> "Whisper":
        """Switch train/eval mode; a frozen Whisper stays in eval mode (no dropout)."""
        super().train(mode)
        if self.params.freeze:
            self.model.eval()
        return self

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames: mel frames ``ceil(L / 160)``, then the stride-2 conv: ``ceil(L / 320)``."""
        mel = torch.div(lengths + self.hop - 1, self.hop, rounding_mode="floor")
        return torch.div(mel + self.stride - 1, self.stride, rounding_mode="floor")

    def _states(self, mel: torch.Tensor, mel_valid: Optional[torch.Tensor]) -> list[torch.Tensor]:
        """Hidden states (embeddings, each layer; the last after LayerNorm) for mel [S, n_mels, F].

        ``mel_valid`` [S] (trim mode) zeroes padded frames and masks them out of attention.
        """
        m = self.model
        x = mel.to(m.conv1.weight.dtype)
        if mel_valid is not None:
            x = x * frames_mask(mel_valid, x.shape[-1]).logical_not()[:, None, :]
        x = nn.functional.gelu(m.conv1(x))
        if mel_valid is not None:
            x = x * frames_mask(mel_valid, x.shape[-1]).logical_not()[:, None, :]
        x = nn.functional.gelu(m.conv2(x)).permute(0, 2, 1)
        n = x.shape[1]
        attn_mask = None
        if mel_valid is not None:
            pad = frames_mask(torch.div(mel_valid + self.stride - 1, self.stride, rounding_mode="floor"), n)
            x = x * pad.logical_not()[..., None]
            attn_mask = torch.zeros(pad.shape, dtype=x.dtype, device=x.device).masked_fill(
                pad, torch.finfo(x.dtype).min
            )
            attn_mask = attn_mask[:, None, None, :]
        h = x + m.embed_positions.weight[:n]
        h = nn.functional.dropout(h, p=m.dropout, training=m.training)
        states = [h]
        for layer in m.layers:
            if m.training and m.layerdrop > 0.0 and bool(torch.rand([]) < m.layerdrop):
                states.append(h)
                continue
            h = layer(h, attn_mask)
            states.append(h)
        states[-1] = m.layer_norm(h)
        return states if self.select.needs_all else states[-1:]

    def forward(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> EncoderOutput:
        """Encode ``waveforms`` [B, T] (16 kHz) with valid ``lengths`` [B] -> 50 Hz features."""
        dev = self.model.conv1.weight.device
        x, lengths = prepare_waveforms(waveforms, lengths, dev)
        b = x.shape[0]
        win, spf = self.window_samples, self.samples_per_frame
        chunks = torch.div(lengths + win - 1, win, rounding_mode="floor").clamp_min(1)
        max_chunks = int(chunks.max())
        x = nn.functional.pad(x, (0, max_chunks * win - x.shape[1]))[:, : max_chunks * win]
        seg_item = torch.repeat_interleave(torch.arange(b, device=dev), chunks)
        seg_idx = torch.arange(seg_item.numel(), device=dev) - torch.repeat_interleave(
            torch.cumsum(chunks, 0) - chunks, chunks
        )
        seg_len = (lengths[seg_item] - seg_idx * win).clamp(0, win)
        segs = x.view(b, max_chunks, win)[seg_item, seg_idx]
        if self.params.window == "pad30":
            mel_valid = None
            mel = whisper_log_mel(segs, self.config.num_mel_bins, hop=self.hop)
        else:
            span = max(int(seg_len.max()), 1)
            span = -(-span // spf) * spf
            # 200 extra zeros (n_fft / 2) so the centred STFT's last kept frames see zeros, not a
            # reflection of the clip, whatever length the batch is padded to.
            segs = nn.functional.pad(segs[:, :span], (0, 200))
            mel = whisper_log_mel(segs, self.config.num_mel_bins, hop=self.hop)[..., : span // self.hop]
            mel_valid = torch.div(seg_len + self.hop - 1, self.hop, rounding_mode="floor")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.params.freeze):
            states = self._states(mel, mel_valid)
        feats = self.select(states)
        n_seg, d = feats.shape[1], feats.shape[2]
        out = feats.new_zeros(b, max_chunks, n_seg, d)
        out[seg_item, seg_idx] = feats
        out = out.view(b, max_chunks * n_seg, d)
        frames = self.num_frames(lengths)
        n = max(int(frames.max()), 1)
        out = out[:, :n]
        pad = frames_mask(frames, n)
        return EncoderOutput(out.masked_fill(pad[..., None], 0.0), pad)
