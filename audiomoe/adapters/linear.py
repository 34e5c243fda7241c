"""Linear adapter: ``y = W x + b`` per frame, the identity when the encoder already has the model width.

The plainest bridge from an encoder's natural width (Whisper-large: 1280) to ``d_model``; keeps
the frame rate. The default adapter of every spec.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.interfaces import Adapter
from audiomoe.core.specs import Params


class LinearAdapter(Adapter):
    """One linear map per frame (identity when ``in_dim == d_model`` and ``identity_if_same``)."""

    class Params(Params):
        identity_if_same: bool = Field(True, description="no parameters when the encoder width already equals d_model")

    def __init__(self, params: Params, *, in_dim: int, d_model: int) -> None:
        super().__init__(params)
        same = in_dim == d_model and self.params.identity_if_same
        self.map: nn.Module = nn.Identity() if same else nn.Linear(in_dim, d_model)
        self.stride = 1

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map every frame; padded frames stay zero."""
        return self.map(features).masked_fill(padding_mask[..., None], 0.0), padding_mask
