"""Uniform scorer (ablation baseline): equal logits for every column, whatever the input.

``logits = 0``: with the dense selector every column gets weight ``1/E`` (a plain average);
with top-k the first k columns win every tie (a fixed choice).
"""

from __future__ import annotations

from typing import Optional

import torch

from audiomoe.core.specs import Params
from audiomoe.routers.base import Scorer


class UniformScorer(Scorer):
    """All-zero logits over ``num_experts`` columns."""

    class Params(Params):
        pass

    def __init__(self, params: Params, *, num_experts: int) -> None:
        super().__init__(params)
        self.num_experts = num_experts

    def forward(
        self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Zeros [N, E]."""
        return inputs.new_zeros(inputs.shape[0], self.num_experts)
