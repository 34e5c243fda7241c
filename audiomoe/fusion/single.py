"""One router, one weighted sum of the weak features, joined to the base features (MoWE-Audio, arXiv 2409.06635).

``r = router(h_b)`` (weights over the M weak encoders, zero where unselected), ``z = sum_k r_k z_k``:

- ``concat``: ``h = [h_b ; z]`` (the paper's feature-axis concatenation), width ``D_b + C``;
- ``sum``: ``h = h_b + z`` (``C = D_b``);
- ``gated_sum``: ``h = h_b + sigmoid(W [h_b ; z]) * z`` (``C = D_b``).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Fusion, Routing
from audiomoe.core.specs import ComponentSpec, Slot
from audiomoe.fusion.base import RouterInput, WeakFeatures, route, weighted_sum


class _SingleRouter(Fusion):
    """Base of the one-router fusions: route, weigh, then ``join``."""

    adds: ClassVar[bool] = False  # sum-like fusions need C == D_b
    gated: ClassVar[bool] = False  # a learned gate on the weak contribution

    class Params(RouterInput):
        router: Annotated[ComponentSpec, Slot("router")] = Field(
            default_factory=lambda: ComponentSpec(name="mowe", params={"balance_weight": 1.0}),
            description="picks weak encoders per sample from the base features (and task)",
        )

    def __init__(
        self,
        params: Params,
        *,
        router: Any,
        d_base: int,
        weak_dim: int,
        num_weak: int,
        task_names: Optional[list[str]] = None,
    ) -> None:
        super().__init__(params)
        if self.adds and weak_dim != d_base:
            raise AudioMoEError(
                f"fusion '{type(self).__name__}' adds weak features to the base features, so the mixture's proj_dim ({weak_dim}) "
                f"must equal the base width ({d_base}); leave proj_dim unset"
            )
        self.router = router(d_model=d_base, num_experts=num_weak, task_names=list(task_names or []))
        self.weak_dim = weak_dim
        self.output_dim = d_base if self.adds else d_base + weak_dim
        self.gate = nn.Linear(2 * weak_dim, weak_dim) if self.gated else None

    def route(
        self, base: torch.Tensor, valid: torch.Tensor, task_ids: Optional[torch.Tensor] = None
    ) -> dict[str, Routing]:
        """``{"": routing}``: one decision per sample."""
        return {"": route(self.router, self.params.router_input, base, valid, task_ids)}

    def forward(self, base: torch.Tensor, weak: WeakFeatures, routing: dict[str, Routing]) -> torch.Tensor:
        """Join ``base`` [B, N, D_b] and the routed weak features."""
        return self.join(base, weighted_sum(routing[""].weights, weak, base, self.weak_dim))

    def join(self, base: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Combine base and weak features."""
        raise NotImplementedError


class Concat(_SingleRouter):
    """``[h_b ; z]``: base and routed weak features side by side (MoWE-Audio)."""

    def join(self, base: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Concatenate along the feature axis."""
        return torch.cat([base, z], -1)


class Sum(_SingleRouter):
    """``h_b + z`` (weak features projected to the base width)."""

    adds = True

    def join(self, base: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Add."""
        return base + z


class GatedSum(_SingleRouter):
    """``h_b + sigmoid(W [h_b ; z]) * z``: a learned per-feature gate on the weak contribution."""

    adds = True
    gated = True

    def join(self, base: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gate then add."""
        return base + torch.sigmoid(self.gate(torch.cat([base, z], -1))) * z
