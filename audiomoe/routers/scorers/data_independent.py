"""Data-independent scorer (MoWE-Audio's data-independent router): learned logits that ignore the audio.

``logits(item) = b + T[task(item)]``: one learned vector ``b`` [E] shared by every item, plus (with
``per_task``) one row per task of a table ``T`` [num_tasks, E] (MoWE: "selects fixed weak encoders
for every sample"; whether the paper's vector is per task is not stated, so both are offered).
Items without a task id use ``b`` alone. Initialised to zeros: uniform until trained.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.specs import Params
from audiomoe.routers.base import Scorer


class DataIndependentScorer(Scorer):
    """A learned logit vector, optionally one per task."""

    class Params(Params):
        per_task: bool = Field(True, description="add a learned row per task (needs the model's task names)")
        init_std: float = Field(0.0, ge=0.0, le=10.0, description="std of the initial logits (0: uniform start)")

    def __init__(self, params: Params, *, num_experts: int, task_names: Optional[list[str]] = None) -> None:
        super().__init__(params)
        rows = len(task_names) if (self.params.per_task and task_names) else 0
        self.task_names = list(task_names or [])
        self.bias = nn.Parameter(torch.randn(num_experts) * self.params.init_std)
        self.table = nn.Parameter(torch.randn(rows, num_experts) * self.params.init_std)

    def forward(self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits [N, E]: the shared vector (+ the item's task row when task ids are given)."""
        n = inputs.shape[0]
        logits = self.bias.to(inputs.dtype).expand(n, -1)
        if task_ids is not None and self.params.per_task:
            rows = self.table.shape[0]
            if rows == 0:
                raise AudioMoEError("data_independent scorer got task ids but was built without task_names; its parent must inject task_names")
            bad = (task_ids < 0) | (task_ids >= rows)
            if bad.any():
                raise AudioMoEError(f"task id {int(task_ids[bad][0])} is out of range: the scorer knows {rows} tasks {self.task_names}")
            logits = logits + self.table.to(inputs.dtype)[task_ids]
        return logits
