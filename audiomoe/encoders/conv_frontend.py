"""A small convolutional encoder straight from raw audio (a wav2vec2-style feature encoder, shrunk).

Baseline for ablations and tests: per-utterance waveform normalisation over the valid samples,
then ``len(kernels)`` strided 1-D convolutions with GELU, then LayerNorm and a linear map to
``dim``. With the default kernels (10, 4, 4) and strides (10, 4, 4) one frame covers 160 samples:
100 frames per second at 16 kHz, like Whisper's mel frames. No padding is used, so
``N = floor((L - k) / s) + 1`` per layer, and the padding mask is exact.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from audiomoe.core.interfaces import Encoder, EncoderOutput
from audiomoe.core.specs import Params


class ConvFrontend(Encoder):
    """Strided 1-D conv stack over raw waveforms -> [B, N, dim] features."""

    class Params(Params):
        sample_rate: int = Field(16000, gt=0, description="input sample rate in Hz")
        dim: int = Field(64, ge=1, description="output feature width")
        channels: int = Field(64, ge=1, description="conv channels")
        kernels: list[int] = Field(
            default_factory=lambda: [10, 4, 4], min_length=1, description="kernel size per layer"
        )
        strides: list[int] = Field(default_factory=lambda: [10, 4, 4], min_length=1, description="stride per layer")
        normalize: bool = Field(True, description="zero-mean unit-variance per utterance over valid samples")

        @model_validator(mode="after")
        def _same_length(self) -> "ConvFrontend.Params":
            if len(self.kernels) != len(self.strides):
                raise ValueError(
                    f"kernels ({len(self.kernels)}) and strides ({len(self.strides)}) need one entry per layer"
                )
            if any(k < s for k, s in zip(self.kernels, self.strides)) or min(self.strides) < 1:
                raise ValueError("each kernel must be >= its stride >= 1 (otherwise samples are skipped)")
            return self

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.sample_rate, self.output_dim = p.sample_rate, p.dim
        hop = 1
        for s in p.strides:
            hop *= s
        self.frame_rate = p.sample_rate / hop
        layers: list[nn.Module] = []
        cin = 1
        for k, s in zip(p.kernels, p.strides):
            layers += [nn.Conv1d(cin, p.channels, k, stride=s), nn.GELU()]
            cin = p.channels
        self.convs = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(p.channels)
        self.out = nn.Linear(p.channels, p.dim)

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Exact valid frame count for ``lengths`` samples (0 when shorter than the receptive field)."""
        n = lengths.clone()
        for k, s in zip(self.params.kernels, self.params.strides):
            n = torch.where(n >= k, torch.div(n - k, s, rounding_mode="floor") + 1, torch.zeros_like(n))
        return n

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """Encode ``waveforms`` [B, T] with valid ``lengths`` [B]."""
        b, t = waveforms.shape
        valid = torch.arange(t, device=waveforms.device)[None, :] < lengths[:, None]
        x = waveforms * valid
        if self.params.normalize:
            n = lengths.clamp_min(1)[:, None].to(x.dtype)
            mean = x.sum(1, keepdim=True) / n
            var = ((x - mean) * valid).pow(2).sum(1, keepdim=True) / n
            x = (x - mean) * torch.rsqrt(var + 1e-7) * valid
        min_len = self.params.kernels[0]
        if t < min_len:  # keep the conv stack defined for clips shorter than one frame
            x = nn.functional.pad(x, (0, min_len - t))
        h = self.convs(x[:, None, :]).transpose(1, 2)
        feats = self.out(self.norm(h))
        frames = self.num_frames(lengths).clamp_max(feats.shape[1])
        pad = torch.arange(feats.shape[1], device=feats.device)[None, :] >= frames[:, None]
        return EncoderOutput(feats.masked_fill(pad[..., None], 0.0), pad)
