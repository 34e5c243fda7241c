"""Data-independent scorer (MoWE-Audio's data-independent router): learned logits that ignore the audio.

``logits(item) = b + T[task(item)]``: one learned vector ``b`` [E] shared by every item, plus (with
``per_task``) one row per task of a table ``T`` [num_tasks, E] (MoWE: "selects fixed weak encoders
for every sample"; whether the paper's vector is per task is not stated, so both are offered).
Items without a task id use ``b`` alone. Initialised to zeros: uniform until trained.

``logit_scale`` ``s`` multiplies both: ``logits = s (b + T[task])``. AdamW moves a parameter by
about ``lr`` per step whatever the size of its gradient, so at lr 3e-3 a logit of scale 1 moves
less than 1 in 300 steps and the router stays near uniform (issue 26: top probability 0.335
against 1/3); ``s`` makes the logits move ``s`` times faster (an lr multiplier that travels with
the model spec, unlike ``optim.lr_mult``). Default 10: on tones with one pretrained weak encoder of
three (tests/train/test_mowe_pretrained.py) the per-task top probability after 60 steps went 0.35 (s=1)
-> 0.51 (s=10, top-1); the table is stored divided by ``s``, so ``init_std`` stays the logits' std.
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
        logit_scale: float = Field(
            10.0, gt=0.0, le=1000.0, description="multiplies the logits: s x the table's lr under AdamW"
        )

    def __init__(self, params: Params, *, num_experts: int, task_names: Optional[list[str]] = None) -> None:
        super().__init__(params)
        rows = len(task_names) if (self.params.per_task and task_names) else 0
        self.task_names = list(task_names or [])
        std = self.params.init_std / self.params.logit_scale
        self.bias = nn.Parameter(torch.randn(num_experts) * std)
        self.table = nn.Parameter(torch.randn(rows, num_experts) * std)

    def forward(
        self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits [N, E]: the shared vector (+ the item's task row when task ids are given)."""
        n, scale = inputs.shape[0], self.params.logit_scale
        logits = (self.bias * scale).to(inputs.dtype).expand(n, -1)
        if task_ids is not None and self.params.per_task:
            rows = self.table.shape[0]
            if rows == 0:
                raise AudioMoEError(
                    "data_independent scorer got task ids but was built without task_names; its parent must inject task_names"
                )
            bad = (task_ids < 0) | (task_ids >= rows)
            if bad.any():
                raise AudioMoEError(
                    f"task id {int(task_ids[bad][0])} is out of range: the scorer knows {rows} tasks {self.task_names}"
                )
            logits = logits + (self.table * scale).to(inputs.dtype)[task_ids]
        return logits
