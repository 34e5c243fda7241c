"""Strided 1-D convolution adapter (the length adapter of speech LLMs, e.g. Speech-LLaMA / SLAM-ASR's conv projector).

``y = GELU(Conv1d(x))`` with kernel ``kernel`` and stride ``stride`` over time, then a linear map
to ``d_model``: downsamples the frame rate by ``stride`` while mixing neighbouring frames. A
frame is padding when its window starts past the valid frames.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from audiomoe.core.interfaces import Adapter
from audiomoe.core.specs import Params


class ConvAdapter(Adapter):
    """Conv1d (kernel, stride) + GELU + linear to ``d_model``."""

    class Params(Params):
        stride: int = Field(2, ge=1, le=64, description="time downsampling factor")
        kernel: int = Field(3, ge=1, le=129, description="convolution window in frames (>= stride)")
        hidden: Optional[int] = Field(None, ge=1, le=65536, description="conv channels (None = d_model)")

        @model_validator(mode="after")
        def _kernel_covers_stride(self) -> "ConvAdapter.Params":
            if self.kernel < self.stride:
                raise ValueError(f"kernel={self.kernel} must be >= stride={self.stride}, or frames are skipped")
            return self

    def __init__(self, params: Params, *, in_dim: int, d_model: int) -> None:
        super().__init__(params)
        p = self.params
        hidden = p.hidden or d_model
        self.conv = nn.Conv1d(in_dim, hidden, p.kernel, stride=p.stride)
        self.out = nn.Linear(hidden, d_model)
        self.stride = p.stride

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, in_dim] -> [B, ceil(N / stride), d_model]; padded input frames are zeroed first."""
        p = self.params
        x = features.masked_fill(padding_mask[..., None], 0.0).transpose(1, 2)
        n = x.shape[-1]
        n_out = -(-n // p.stride)
        x = F.pad(x, (0, max((n_out - 1) * p.stride + p.kernel - n, 0)))
        y = self.out(F.gelu(self.conv(x)).transpose(1, 2))[:, :n_out]
        valid = (~padding_mask).sum(1)
        pad = torch.arange(n_out, device=y.device)[None, :] * p.stride >= valid[:, None]
        return y.masked_fill(pad[..., None], 0.0), pad
