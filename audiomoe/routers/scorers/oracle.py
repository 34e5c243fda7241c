"""Oracle scorer (ablation baseline): routes by the task id, fixed, not learned.

Task ``t`` goes to column ``assignment[t]`` (default ``t mod E``): its logit is ``margin``, the
others 0, so top-1 picks exactly that column. The upper bound "perfect task routing" of an
ablation. Without task ids (a parent that does not pass them, e.g. a token-level MoE layer)
every item counts as task 0, with a warning, unless ``require_task_ids``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from pydantic import Field

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.specs import Params
from audiomoe.routers.base import Scorer


class OracleScorer(Scorer):
    """One fixed column per task."""

    class Params(Params):
        assignment: Optional[list[int]] = Field(
            None, description="column of each task, in task order (None: task t -> t mod E)"
        )
        margin: float = Field(10.0, gt=0.0, le=1000.0, description="logit of the task's column (others 0)")
        require_task_ids: bool = Field(False, description="raise instead of using task 0 when no task ids are given")

    def __init__(self, params: Params, *, num_experts: int, task_names: Optional[list[str]] = None) -> None:
        super().__init__(params)
        self.num_experts = num_experts
        n_tasks = max(len(task_names or []), 1)
        cols = (
            self.params.assignment if self.params.assignment is not None else [t % num_experts for t in range(n_tasks)]
        )
        for t, c in enumerate(cols):
            if not 0 <= c < num_experts:
                raise AudioMoEError(f"oracle assignment[{t}]={c} must be a column in [0, {num_experts - 1}]")
        self.register_buffer("columns", torch.tensor(cols, dtype=torch.long), persistent=False)

    def forward(
        self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits [N, E] with ``margin`` at each item's task column."""
        n = inputs.shape[0]
        if task_ids is None:
            if self.params.require_task_ids:
                raise AudioMoEError("oracle scorer needs task ids (require_task_ids=True) but got none")
            warnings.warn("oracle scorer got no task ids; routing every item as task 0", stacklevel=2)
            task_ids = torch.zeros(n, dtype=torch.long, device=inputs.device)
        if ((task_ids < 0) | (task_ids >= len(self.columns))).any():
            bad = int(task_ids[(task_ids < 0) | (task_ids >= len(self.columns))][0])
            raise AudioMoEError(
                f"task id {bad} has no oracle column: the assignment covers tasks 0..{len(self.columns) - 1}"
            )
        cols = self.columns.to(inputs.device)[task_ids]
        logits = inputs.new_zeros(n, self.num_experts)
        return logits.scatter(-1, cols[:, None], self.params.margin)
