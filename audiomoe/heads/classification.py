"""Utterance classification head, single- or multi-label: pool over valid frames, then a linear layer.

``logits = W pool_{t valid}(h_t) + b``. Pooling is the mean over valid frames, or attentive pooling
(``a_t = softmax_t(w^T h_t)`` over valid frames, ``sum_t a_t h_t``). Single-label (emotion,
speaker, language): cross-entropy (optional label smoothing); accuracy and macro-F1.
Multi-label (sound events, music tags): per-class sigmoid with binary cross-entropy; macro mAP
(over classes with at least one positive, the AudioSet convention), macro-F1 and subset accuracy at
``threshold``. Metrics come from torchmetrics. Items with no valid frame pool to zeros, not NaN.

Targets, per item: single-label, a class index or a label name (when ``labels`` is set);
multi-label, a list of class indices or label names (an empty list: no class present).
Predictions: single-label, the arg-max class [B] (long); multi-label, per-class probabilities
[B, C] (float; threshold them with ``params.threshold``, or use :meth:`decode`).
"""

from __future__ import annotations

import operator
from typing import Any, Literal, Mapping, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Head
from audiomoe.core.specs import Params
from audiomoe.heads.functional import masked_mean

__all__ = ["Classification", "masked_mean"]


class Classification(Head):
    """Single- or multi-label classification over ``num_classes`` classes from pooled features."""

    clip_level = True  # a label holds for any window of its clip: training may crop

    class Params(Params):
        num_classes: int = Field(2, ge=2, le=100_000, description="number of classes")
        multi_label: bool = Field(
            False, description="independent sigmoid per class (sound events, tags) instead of softmax"
        )
        labels: Optional[list[str]] = Field(
            None, description="class names (targets may then be names); length num_classes"
        )
        pooling: Literal["mean", "attention"] = Field("mean", description="pooling over valid frames")
        threshold: float = Field(
            0.5, gt=0.0, lt=1.0, description="multi-label: probability above which a class is predicted"
        )
        label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="single-label cross-entropy label smoothing")
        loss_weight: float = Field(1.0, ge=0.0, le=1000.0, description="weight of this head's loss in the total loss")

        @model_validator(mode="after")
        def _labels_match(self) -> "Classification.Params":
            if self.labels is not None:
                if len(self.labels) != self.num_classes:
                    raise ValueError(f"labels has {len(self.labels)} names but num_classes is {self.num_classes}")
                if len(set(self.labels)) != len(self.labels):
                    raise ValueError("labels must be distinct")
            return self

    def __init__(self, params: Params, *, d_model: int) -> None:
        super().__init__(params)
        self.loss_weight = self.params.loss_weight
        # no bias: a constant added to every frame's score cancels in the softmax (it could never learn)
        self.attn = nn.Linear(d_model, 1, bias=False) if self.params.pooling == "attention" else None
        self.head = nn.Linear(d_model, self.params.num_classes)
        self._index = {name: i for i, name in enumerate(self.params.labels or [])}

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        if self.attn is None:
            pooled = masked_mean(features, padding_mask)
        else:
            scores = self.attn(features).squeeze(-1).masked_fill(padding_mask, float("-inf"))
            weights = torch.softmax(scores, -1).nan_to_num(0.0)  # an all-padded item pools to zeros
            pooled = torch.einsum("bn,bnd->bd", weights, features)
        return self.head(pooled)

    def _class_index(self, label: Any) -> int:
        if isinstance(label, str):
            if label not in self._index:
                known = ", ".join(self.params.labels or []) or (
                    "(none: this head has no label names; give them in its 'labels' param, e.g. --set tasks.<task>.labels=[a,b,c], "
                    "or use class indices)"
                )
                raise AudioMoEError(f"label '{label}' is not in the label set; known labels: {known}")
            return self._index[label]
        try:
            if isinstance(label, bool):
                raise TypeError
            i = operator.index(label)
        except TypeError:
            raise AudioMoEError(f"label {label!r} must be a class index or a label name") from None
        if not 0 <= i < self.params.num_classes:
            raise AudioMoEError(
                f"label {i} is outside the label set [0, {self.params.num_classes}); fix the data or raise num_classes"
            )
        return i

    def make_targets(self, raw: list[Any], device: torch.device) -> torch.Tensor:
        """Single-label: class indices [B] (long). Multi-label: multi-hot [B, C] (float)."""
        if not self.params.multi_label:
            return torch.tensor([self._class_index(r) for r in raw], dtype=torch.long, device=device)
        out = torch.zeros(len(raw), self.params.num_classes, device=device)
        for i, item in enumerate(raw):
            if isinstance(item, (str, int)) or not hasattr(item, "__iter__"):
                raise AudioMoEError(f"multi-label target of item {i} must be a list of labels, got {item!r}")
            for label in item:
                out[i, self._class_index(label)] = 1.0
        return out

    def example_targets(self, n: int) -> list[Any]:
        """``n`` valid raw targets."""
        c = self.params.num_classes
        if self.params.multi_label:
            return [[i % c, (i + 1) % c] if i % 3 else [] for i in range(n)]
        return [i % c for i in range(n)]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (single-label) or mean binary cross-entropy over classes (multi-label)."""
        if self.params.multi_label:
            return nn.functional.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype))
        return nn.functional.cross_entropy(outputs, targets, label_smoothing=self.params.label_smoothing)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Arg-max class per item (single-label) or per-class probabilities [B, C] (multi-label)."""
        if self.params.multi_label:
            return torch.sigmoid(outputs)
        return outputs.argmax(-1)

    def decode(self, predictions: torch.Tensor) -> list[Any]:
        """Predictions as labels: a name or index per item, or (multi-label) a list per item."""
        names = self.params.labels
        if not self.params.multi_label:
            return [names[i] if names else i for i in predictions.tolist()]
        rows = (predictions >= self.params.threshold).tolist()
        return [[names[j] if names else j for j, on in enumerate(row) if on] for row in rows]

    def metrics(self, predictions: torch.Tensor, targets: torch.Tensor) -> Mapping[str, float]:
        """Single-label: accuracy, macro_f1. Multi-label: mAP, macro_f1, subset_accuracy."""
        from torchmetrics.functional import classification as tmc

        c = self.params.num_classes
        if not self.params.multi_label:
            return {
                "accuracy": float((predictions == targets).float().mean()),
                "macro_f1": float(tmc.multiclass_f1_score(predictions, targets, num_classes=c, average="macro")),
            }
        t = targets.long()
        present = t.sum(0) > 0
        if present.any():
            cols = present.nonzero().flatten()
            m_ap = float(
                tmc.multilabel_average_precision(
                    predictions[:, cols], t[:, cols], num_labels=len(cols), average="macro"
                )
            )
        else:
            m_ap = float("nan")
        decided = (predictions >= self.params.threshold).long()
        return {
            "mAP": m_ap,
            "macro_f1": float(
                tmc.multilabel_f1_score(predictions, t, num_labels=c, threshold=self.params.threshold, average="macro")
            ),
            "subset_accuracy": float((decided == t).all(-1).float().mean()),
        }
