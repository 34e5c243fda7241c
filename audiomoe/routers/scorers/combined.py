"""Combined scorer (MoWE-Audio's dual routing): a data-independent and a data-dependent scorer mixed.

``logits = (1 - mix) * independent(task) + mix * dependent(x)``. Both halves are slots (any
scorer), so the MoWE ablation "data-independent only / data-dependent only / both" is
``mix=0 / mix=1 / 0 < mix < 1``. The paper combines the two routers' outputs separately; mixing
their logits is our documented choice (papers.md §1.2: the exact form is not published).
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch
from pydantic import Field

from audiomoe.core.specs import ComponentSpec, Params, Slot
from audiomoe.routers.base import Scorer


class CombinedScorer(Scorer):
    """Mix of two scorers' logits with a fixed weight ``mix``."""

    class Params(Params):
        independent: Annotated[ComponentSpec, Slot("scorer")] = Field(
            default_factory=lambda: ComponentSpec(name="data_independent"), description="the input-free half"
        )
        dependent: Annotated[ComponentSpec, Slot("scorer")] = Field(
            default_factory=lambda: ComponentSpec(name="mlp"), description="the input-dependent half"
        )
        mix: float = Field(0.5, ge=0.0, le=1.0, description="weight of the data-dependent logits")

    def __init__(
        self,
        params: Params,
        *,
        d_model: int,
        num_experts: int,
        independent: Any,
        dependent: Any,
        task_names: Optional[list[str]] = None,
    ) -> None:
        super().__init__(params)
        ctx = {"d_model": d_model, "num_experts": num_experts, "task_names": task_names}
        self.independent = independent(**ctx)
        self.dependent = dependent(**ctx)

    def forward(
        self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``(1 - mix) * independent + mix * dependent`` logits [N, E]."""
        m = self.params.mix
        a = self.independent(inputs, item_mask, task_ids)
        b = self.dependent(inputs, item_mask, task_ids)
        return (1.0 - m) * a + m * b
