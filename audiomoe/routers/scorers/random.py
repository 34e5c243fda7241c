"""Random scorer (ablation baseline): seeded Gaussian logits, drawn afresh on every call.

``logits ~ N(0, scale^2)`` i.i.d.; with top-k this picks a uniformly random subset per item.
Call ``c`` of the module uses the generator seeded with ``seed + c``, so a run is reproducible.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from audiomoe.core.specs import Params
from audiomoe.routers.base import Scorer


class RandomScorer(Scorer):
    """Input-independent random logits, reproducible from ``seed``."""

    class Params(Params):
        seed: int = Field(0, ge=0, description="seed of the first call (call c uses seed + c)")
        scale: float = Field(1.0, gt=0.0, le=100.0, description="std of the random logits")

    def __init__(self, params: Params, *, num_experts: int) -> None:
        super().__init__(params)
        self.num_experts = num_experts
        self.calls = 0

    def forward(
        self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Fresh random logits [N, E]."""
        gen = torch.Generator(device=inputs.device).manual_seed(self.params.seed + self.calls)
        self.calls += 1
        shape = (inputs.shape[0], self.num_experts)
        return (
            torch.randn(shape, generator=gen, device=inputs.device, dtype=torch.float32).to(inputs.dtype)
            * self.params.scale
        )
