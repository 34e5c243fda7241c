"""Frame-stacking MLP adapter (MoWE-Audio, arXiv 2409.06635; as SALMONN / Qwen-Audio-style projectors).

``y_t = MLP([x_{kt} ; x_{kt+1} ; ... ; x_{kt+k-1}])``: ``stack`` consecutive frames are concatenated
along the feature axis (the frame rate drops by ``stack``, the sequence the LLM sees gets shorter),
then an MLP of ``layers`` linear maps (GELU between) reaches ``d_model``. A stacked frame is
padding only when all its frames are; padded frames enter as zeros, so padding never leaks.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.interfaces import Adapter
from audiomoe.core.specs import Params
from audiomoe.encoders.align import stack_frames


class StackMLPAdapter(Adapter):
    """Stack ``stack`` frames, then an MLP to ``d_model``."""

    class Params(Params):
        stack: int = Field(2, ge=1, le=64, description="frames stacked along the feature axis (time downsampling)")
        layers: int = Field(2, ge=1, le=8, description="MLP depth (1 = a single linear map)")
        hidden: Optional[int] = Field(None, ge=1, le=65536, description="MLP hidden width (None = d_model)")

    def __init__(self, params: Params, *, in_dim: int, d_model: int) -> None:
        super().__init__(params)
        p = self.params
        width, hidden = in_dim * p.stack, p.hidden or d_model
        mods: list[nn.Module] = []
        for i in range(p.layers):
            last = i == p.layers - 1
            mods.append(nn.Linear(width if i == 0 else hidden, d_model if last else hidden))
            if not last:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        self.stride = p.stack

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, in_dim] -> [B, ceil(N / stack), d_model]."""
        # zero padded frames first: a stacked frame may hold valid and padded frames side by side
        h, pad = stack_frames(features.masked_fill(padding_mask[..., None], 0.0), padding_mask, self.params.stack)
        return self.mlp(h).masked_fill(pad[..., None], 0.0), pad
