"""Utterance classification head: mean-pool features over valid frames, then a linear layer.

``logits = W mean_{t valid}(h_t) + b``; cross-entropy loss (optional label smoothing); accuracy.
Items with no valid frame pool to zeros rather than NaN.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Task
from audiomoe.core.specs import Params


def masked_mean(features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``features`` [B, N, D] over frames where ``padding_mask`` [B, N] is False."""
    keep = (~padding_mask).unsqueeze(-1).to(features.dtype)
    return (features * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class Classification(Task):
    """Single-label classification over ``num_classes`` classes."""

    class Params(Params):
        num_classes: int = Field(2, ge=2, description="number of classes")
        label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing")

    def __init__(self, params: Params, *, d_model: int) -> None:
        super().__init__(params)
        self.head = nn.Linear(d_model, self.params.num_classes)

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        return self.head(masked_mean(features, padding_mask))

    def make_targets(self, raw: list[Any], device: torch.device) -> torch.Tensor:
        """Class indices as a long tensor; refuses labels outside ``[0, num_classes)``."""
        t = torch.as_tensor(raw, dtype=torch.long, device=device)
        bad = (t < 0) | (t >= self.params.num_classes)
        if bad.any():
            raise AudioMoEError(
                f"label {int(t[bad][0])} is outside the label set [0, {self.params.num_classes}); "
                f"fix the data or raise num_classes"
            )
        return t

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy."""
        return nn.functional.cross_entropy(outputs, targets, label_smoothing=self.params.label_smoothing)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Arg-max class per item."""
        return outputs.argmax(-1)

    def metrics(self, predictions: torch.Tensor, targets: torch.Tensor) -> Mapping[str, float]:
        """Accuracy."""
        return {"accuracy": float((predictions == targets).float().mean())}
