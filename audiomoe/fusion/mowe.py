"""MoWE-Audio's two-router fusion (Zhang et al., ICASSP 2025, arXiv 2409.06635): ``[z_base ; z_indep ; z_dep]``.

A data-independent router (learned logits per task that ignore the audio) and a data-dependent
router (scoring the pooled base features) each pick and weigh weak encoders; each gives its own
weighted sum of the weak features, and the three are concatenated:
``h = [h_b ; sum_k r^indep_k z_k ; sum_k r^dep_k z_k]``, width ``D_b + 2C``. Only the union of the
two routers' picks runs. Each router is a slot, so either can be swapped or ablated in config.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import torch
from pydantic import Field

from audiomoe.core.interfaces import Fusion, Routing
from audiomoe.core.specs import ComponentSpec, Slot
from audiomoe.fusion.base import RouterInput, WeakFeatures, route, weighted_sum


def _router(scorer: str) -> Any:
    spec = {
        "scorer": {"name": scorer},
        "selector": {"name": "top_k", "params": {"k": 1, "top1": "raw"}},
        "balance_weight": 1.0,
    }
    return lambda: ComponentSpec(name="scored", params=spec)


class MoWETwoRouters(Fusion):
    """``[h_b ; z_indep ; z_dep]``: a data-independent and a data-dependent router, each its own weighted sum."""

    class Params(RouterInput):
        independent: Annotated[ComponentSpec, Slot("router")] = Field(
            default_factory=_router("data_independent"),
            description="the data-independent router (per-task logits, ignores the audio)",
        )
        dependent: Annotated[ComponentSpec, Slot("router")] = Field(
            default_factory=_router("mlp"), description="the data-dependent router (scores the pooled base features)"
        )

    def __init__(
        self,
        params: Params,
        *,
        independent: Any,
        dependent: Any,
        d_base: int,
        weak_dim: int,
        num_weak: int,
        task_names: Optional[list[str]] = None,
    ) -> None:
        super().__init__(params)
        ctx = {"d_model": d_base, "num_experts": num_weak, "task_names": list(task_names or [])}
        self.independent, self.dependent = independent(**ctx), dependent(**ctx)
        self.weak_dim = weak_dim
        self.output_dim = d_base + 2 * weak_dim

    def route(
        self, base: torch.Tensor, valid: torch.Tensor, task_ids: Optional[torch.Tensor] = None
    ) -> dict[str, Routing]:
        """``{"independent": ..., "dependent": ...}``: two decisions per sample."""
        how = self.params.router_input
        return {name: route(getattr(self, name), how, base, valid, task_ids) for name in ("independent", "dependent")}

    def forward(self, base: torch.Tensor, weak: WeakFeatures, routing: dict[str, Routing]) -> torch.Tensor:
        """Concatenate the base features and the two routers' weighted sums."""
        z = [weighted_sum(routing[name].weights, weak, base, self.weak_dim) for name in ("independent", "dependent")]
        return torch.cat([base, *z], -1)
