"""Named routers: the composite ``scored`` router with different scorer/selector defaults.

Each is a one-word swap (``--set backbone.moe.router=top_p``) and still exposes both slots, so
``--set backbone.moe.router.scorer=mlp`` crosses it with another scorer. Selector knobs used in
everyday ablations have shortcuts on the router (``backbone.moe.router.k=1``, ``backbone.moe.router.p=0.6``)
that are written into the selector's params at validation, so the resolved spec stays consistent.

- ``scored``: the composite itself (:mod:`audiomoe.routers.scored`, a shared base, not a part):
  linear gate + top-k, every knob at its plain default.
- ``top_k``: linear gate + top-k (k=2), Switch balance 0.01.
- ``top_p``: linear gate + top-p (p=0.7), UniMoE aux loss scheduled 0.025 -> 0.001 over 10k steps.
- ``dense``: linear gate + dense softmax (soft MoE / MoWE soft weighting).
- ``mowe``: data-independent + data-dependent (combined) scorer + top-1 weighted by the raw
  probability, so the task loss trains the router (MoWE-Audio encoder routing; L = L_task + 0.1
  L_MoWE with L_MoWE = Switch balance, the paper's form being unknown). ``top_k`` with ``k=1``
  does the same; ``selector.top1=straight_through`` keeps the weight at 1 with P's gradient.
- Ablation baselines without learned routing: ``uniform`` (dense, equal weights), ``random``
  (seeded random top-2), ``oracle`` (top-1 fixed by task id), ``hash`` (top-1 by a fixed LSH).
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import Field, model_validator

from audiomoe.core.specs import ComponentSpec, Slot
from audiomoe.routers.scored import ScoredRouter


def _spec(name: str, **params: Any) -> Any:
    return lambda: ComponentSpec(name=name, params=params)


def _scorer(name: str, **params: Any) -> Any:
    return Field(default_factory=_spec(name, **params), description="what the router looks at")


def _selector(name: str, **params: Any) -> Any:
    return Field(default_factory=_spec(name, **params), description="how many columns it picks")


def _push(params: Any, field: str) -> Any:
    """Copy a shortcut field (``k`` / ``p``) into the selector's params when it is set."""
    value = getattr(params, field)
    if value is not None:
        sel = params.selector
        object.__setattr__(params, "selector", ComponentSpec(name=sel.name, params={**sel.params, field: value}))
    return params


class _KShortcut(ScoredRouter.Params):
    k: Optional[int] = Field(None, ge=1, le=4096, description="shortcut for selector.k (None: the selector's own)")

    @model_validator(mode="after")
    def _push_k(self) -> Any:
        return _push(self, "k")


class Scored(ScoredRouter):
    """Any scorer x any selector with the composite router's plain defaults (linear scorer, top-k)."""


class TopKRouter(ScoredRouter):
    """Linear gate + top-k with Switch load balance (Switch / Mixtral / GShard)."""

    class Params(_KShortcut):
        scorer: Annotated[ComponentSpec, Slot("scorer")] = _scorer("linear")
        selector: Annotated[ComponentSpec, Slot("selector")] = _selector("top_k", k=2)


class TopPRouter(ScoredRouter):
    """Linear gate + top-p (UniMoE-Audio), UniMoE aux loss annealed 0.025 -> 0.001 over 10k steps."""

    class Params(ScoredRouter.Params):
        scorer: Annotated[ComponentSpec, Slot("scorer")] = _scorer("linear")
        selector: Annotated[ComponentSpec, Slot("selector")] = _selector("top_p", p=0.7)
        p: Optional[float] = Field(None, gt=0.0, le=1.0, description="shortcut for selector.p (None: the selector's own)")
        balance_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of the Switch load-balance loss")
        unimoe_aux_weight: float = Field(0.025, ge=0.0, le=100.0, description="weight of UniMoE's aux loss at step 0")
        unimoe_aux_weight_end: Optional[float] = Field(0.001, ge=0.0, le=100.0, description="weight after unimoe_aux_steps")

        @model_validator(mode="after")
        def _push_p(self) -> Any:
            return _push(self, "p")


class DenseRouter(ScoredRouter):
    """Linear gate + dense softmax: every column, weighted (no balance loss needed)."""

    class Params(ScoredRouter.Params):
        scorer: Annotated[ComponentSpec, Slot("scorer")] = _scorer("linear")
        selector: Annotated[ComponentSpec, Slot("selector")] = _selector("dense")
        balance_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of the Switch load-balance loss")


class MoWERouter(ScoredRouter):
    """MoWE-Audio encoder routing: data-independent + data-dependent (pooled) scorer, top-1 weighted by P (task gradient)."""

    class Params(_KShortcut):
        scorer: Annotated[ComponentSpec, Slot("scorer")] = _scorer("combined")
        # top-1 weighted by the raw probability: a renormalised P/P = 1 would send no task gradient
        selector: Annotated[ComponentSpec, Slot("selector")] = _selector("top_k", k=1, top1="raw")
        balance_weight: float = Field(0.1, ge=0.0, le=100.0, description="weight of the balance loss (MoWE: 0.1 x L_MoWE)")


class UniformRouter(ScoredRouter):
    """Ablation: every column with equal weight (no learning in the router)."""

    class Params(ScoredRouter.Params):
        scorer: Annotated[ComponentSpec, Slot("scorer")] = _scorer("uniform")
        selector: Annotated[ComponentSpec, Slot("selector")] = _selector("dense")
        balance_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of the Switch load-balance loss")


class RandomRouter(ScoredRouter):
    """Ablation: a seeded random top-k subset per item."""

    class Params(_KShortcut):
        scorer: Annotated[ComponentSpec, Slot("scorer")] = _scorer("random")
        selector: Annotated[ComponentSpec, Slot("selector")] = _selector("top_k", k=2)
        balance_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of the Switch load-balance loss")


class OracleRouter(ScoredRouter):
    """Ablation: each task always goes to its own column (top-1 by task id)."""

    class Params(ScoredRouter.Params):
        scorer: Annotated[ComponentSpec, Slot("scorer")] = _scorer("oracle")
        selector: Annotated[ComponentSpec, Slot("selector")] = _selector("top_k", k=1)
        balance_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of the Switch load-balance loss")


class HashRouter(ScoredRouter):
    """Ablation: a fixed locality-sensitive hash of the input picks one column."""

    class Params(ScoredRouter.Params):
        scorer: Annotated[ComponentSpec, Slot("scorer")] = _scorer("hash")
        selector: Annotated[ComponentSpec, Slot("selector")] = _selector("top_k", k=1)
        balance_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of the Switch load-balance loss")
