"""Domain imbalance as a knob: a recipe's ``domains`` declare the training mix once, for every stage.

UniMoE-Audio's curriculum claim (arXiv 2510.13344) is about *imbalanced* domains: naive joint
training degrades the minority domain. A recipe declares its domains and their proportions once::

    domains:
      speech: {tasks: [language, speaker, style], proportion: 8}
      sound: {tasks: [event], proportion: 1}

and every stage (and specialist) whose ``data`` names no sampling of its own (``weights``,
``balanced``, ``temperature``, ``spec``) draws its tasks with weight ``proportion / len(tasks)``
(``--set domains.sound.proportion=2`` changes the mix of every such stage). The sampler turns the
weights into exact per-epoch counts (:func:`audiomoe.data.sampling.exact_counts`), so the stream's
shares match the declared ones to within an item per epoch. A specialists stage without
``members`` gets one specialist per domain, on that domain's tasks.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field


class DomainSpec(BaseModel):
    """One training domain: its tasks and its share of the training stream."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[str] = Field(min_length=1, description="the tasks of this domain")
    proportion: float = Field(gt=0.0, le=1e6, description="relative share of the training items (split over its tasks)")


def domain_weights(domains: Mapping[str, DomainSpec], tasks: Optional[Sequence[str]] = None) -> dict[str, float]:
    """Task -> sampling weight: each domain's proportion split evenly over its tasks (restricted to ``tasks``)."""
    out = {t: d.proportion / len(d.tasks) for d in domains.values() for t in d.tasks}
    return out if tasks is None else {t: w for t, w in out.items() if t in tasks}


def apply_domains(recipe: Any) -> None:
    """Make ``recipe.domains`` the mix of every stage (and specialist) whose data names no sampling of its own.

    Written into the stages, so ``run.json`` shows the weights each stage trained with; a stage that
    already has weights, a balanced subset, temperature sampling or a data spec keeps them.
    """
    from audiomoe.train.recipe import SpecialistMember, StageData

    doms = recipe.domains
    seen = [t for d in (doms or {}).values() for t in d.tasks]
    twice = sorted({t for t in seen if seen.count(t) > 1})
    if twice:
        raise ValueError(f"domains: task(s) {', '.join(twice)} in two domains; give each task one domain")
    for i, st in enumerate(recipe.stages):
        if st.specialists is not None and st.specialists.members is None:
            if not doms:
                raise ValueError(
                    f"stages.{i}.specialists: give 'members', or declare the recipe's 'domains' (one specialist each)"
                )
            st.specialists.members = [
                SpecialistMember(name=n, data=StageData(tasks=list(d.tasks))) for n, d in doms.items()
            ]
        if not doms:
            continue
        # a specialists stage's data is its members' (each on its own tasks)
        members = enumerate(st.specialists.members or []) if st.specialists else ()
        owners = (
            [(f"stages.{i}.specialists.members.{j}", m) for j, m in members]
            if st.specialists
            else [(f"stages.{i}", st)]
        )
        for where, owner in owners:
            sd = owner.data or StageData()
            if any(x is not None for x in (sd.weights, sd.balanced, sd.temperature, sd.spec)):
                continue
            outside = [t for t in (sd.tasks or []) if t not in seen]
            if outside:
                raise ValueError(
                    f"{where}.data.tasks: {', '.join(outside)} in no domain; add them to the recipe's domains"
                )
            owner.data = sd.model_copy(update={"weights": domain_weights(doms, sd.tasks)})
