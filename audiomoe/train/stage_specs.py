"""The specs of what a recipe stage starts from and trains on: its ``init``, its ``data``, its specialists or foundation.

Split from :mod:`audiomoe.train.recipe` (which re-exports them); see there for the recipe as a whole.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """A strictly validated config section (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InitSpec(Strict):
    """Weights to start a stage from: one checkpoint, UniMoE's construction from dense specialists, or an upcycled dense model."""

    from_checkpoint: Optional[str] = Field(
        None, description="a checkpoint or run directory (same architecture), or 'stage:NAME' for a foundation stage"
    )
    from_specialists: Optional[list[str]] = Field(
        None, description="dense checkpoints / run dirs, or 'stage:NAME' for a specialists stage"
    )
    upcycle: Optional[str] = Field(
        None,
        description="a dense checkpoint (the specialists' architecture) or 'stage:NAME' for a foundation stage: "
        "every routed expert a slice of its FFN, the rest copied",
    )
    heads: Literal["owner", "average"] = Field(
        "owner", description="heads from the specialist that trained the task, or averaged"
    )
    strict: bool = Field(True, description="from_checkpoint: every tensor must be present")

    @model_validator(mode="after")
    def _one(self) -> "InitSpec":
        given = [k for k in ("from_checkpoint", "from_specialists", "upcycle") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of 'from_checkpoint', 'from_specialists' and 'upcycle' (got {', '.join(given) or 'none'})"
            )
        if self.from_specialists is not None and not self.from_specialists:
            raise ValueError("from_specialists needs at least one checkpoint")
        return self


class StageData(Strict):
    """A stage's data: a subset / reweighting of the recipe's data, or a data spec of its own."""

    tasks: Optional[list[str]] = Field(None, description="only items of these tasks")
    weights: Optional[dict[str, float]] = Field(
        None, description="task -> sampling weight (imbalanced or rebalanced mixes)"
    )
    epoch_items: Optional[int] = Field(None, ge=1, description="items per epoch with weights (default: all)")
    balanced: Optional[int] = Field(None, ge=1, description="a fixed balanced subset: this many items per task")
    temperature: Optional[float] = Field(None, ge=0.0, le=1.0, description="temperature sampling alpha over tasks")
    spec: Optional[dict[str, Any]] = Field(None, description="a whole data spec (the data layer's format) instead")

    @model_validator(mode="after")
    def _exclusive(self) -> "StageData":
        modes = [m for m in ("weights", "balanced", "temperature") if getattr(self, m) is not None]
        if len(modes) > 1:
            raise ValueError(f"give at most one of weights, balanced, temperature (got {', '.join(modes)})")
        if self.spec is not None and (modes or self.tasks):
            raise ValueError("'spec' replaces the data: give it alone")
        if self.weights is not None and any(w <= 0 for w in self.weights.values()):
            raise ValueError("weights must be > 0")
        return self


class SpecialistMember(Strict):
    """One dense specialist of a specialists stage: its name (its run directory) and its data."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    data: StageData = Field(default_factory=StageData)


class SpecialistsSpec(Strict):
    """UniMoE stage 1: train one dense specialist per member, each on its own data (``DIR/specialists/NAME``)."""

    members: Optional[list[SpecialistMember]] = Field(
        None, min_length=1, description="the specialists (None: one per entry of the recipe's domains, on its tasks)"
    )
    overrides: Optional[list[str]] = Field(
        None, description="model overrides making the dense variant (None: derived, see specialists.py)"
    )


class FoundationSpec(Strict):
    """A shared dense foundation: the specialists' dense model trained as a run of its own (``DIR/foundation/NAME``)."""

    overrides: Optional[list[str]] = Field(
        None,
        description="model overrides making the dense variant (None: as wide as the specialists that start "
        "from it, else one per domain, else the whole MoE width; see stages.py)",
    )
    reuse: bool = Field(
        True,
        description="copy a foundation trained from the same recipe, spec, data, code and device from "
        "$AUDIOMOE_CACHE/foundations instead of training it again (see foundation_cache.py)",
    )
