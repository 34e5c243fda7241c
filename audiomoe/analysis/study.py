"""Study files: a YAML that names models, arms (a target + named variants + a baseline) and paper claims.

The built-in ``papers`` study (``audiomoe/analysis/studies/papers.yaml``) is the example to read.
Top-level keys: ``study`` (name), ``description``, ``seeds``, ``steps``, ``metric`` (the key metric of
tables and claims), ``train`` (``audiomoe train`` options: ``lr``, ``batch_size``, ``eval_batches``,
``data``, ...), ``measure_batches`` (held-out batches of the routing pass), ``compact`` (what
``audiomoe demo`` changes: fewer ``steps`` and ``seeds``, other ``train`` options, and optionally
only some ``variants``), ``models`` (named inline model specs,
written to ``specs/NAME.yaml`` in the study directory), ``arms`` and ``claims``.

An arm's ``target`` is a ``models`` entry, a preset, a YAML path or a recipe; each variant is a list
of ``--set`` overrides or ``{target, set}``. An arm with ``requires: [recipe, ...]`` is a placeholder
until those recipes exist: it is skipped with a message and its claims say "not measured".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from audiomoe.analysis.grid import NAME_RE, Config, Plan, expand
from audiomoe.core.atomic import write_text
from audiomoe.core.errors import AudioMoEError, did_you_mean

STUDIES = Path(__file__).parent / "studies"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantSpec(_Strict):
    """A variant given as a mapping: another ``target`` and/or its overrides."""

    target: Optional[str] = None
    set: list[str] = Field(default_factory=list)
    compact_set: list[str] = Field(
        default_factory=list, description="further overrides in the compact form (audiomoe demo)"
    )
    seeds: Optional[int] = Field(
        None, ge=1, le=100, description="seeds of this variant (default: its arm's): fewer where less power is needed"
    )


class ArmSpec(_Strict):
    """One arm: a target, named variants, a baseline; ``requires`` recipes make it a placeholder until they exist."""

    target: Optional[str] = None
    description: str = ""
    set: list[str] = Field(default_factory=list, description="overrides every variant of the arm gets first")
    variants: dict[str, Union[list[str], VariantSpec]]
    baseline: Optional[str] = None
    requires: list[str] = Field(
        default_factory=list, description="recipes that must exist (audiomoe train RECIPE) or the arm is skipped"
    )
    placeholder: str = Field("", description="why the arm may be skipped (printed with the skip message)")
    steps: Optional[Union[int, Literal["recipe"]]] = Field(
        None, description="steps of this arm (default: the study's); 'recipe': the recipe decides"
    )
    train: Optional[dict[str, Any]] = Field(
        None, description="training options of this arm instead of the study's ({}: none, e.g. for recipes)"
    )
    compact_set: list[str] = Field(
        default_factory=list, description="further overrides of every variant in the compact form"
    )
    seeds: Optional[int] = Field(
        None,
        ge=1,
        le=100,
        description="seeds of this arm (default: the study's): more for a claim that needs the power",
    )


class ClaimSpec(_Strict):
    """A paper claim checked on the study's results.

    ``better``: the candidate's key metric is higher than each reference's (paired interval above 0);
    *equivalent* when two one-sided tests put every difference inside ``±margin``.
    ``cheaper_at_equal_quality``: the candidate's ``cost`` is lower (interval below 0) while its key
    metric is not worse by more than ``margin`` (interval's low end above ``-margin``).
    ``role: control``: a positive control (a known effect); claims are interpreted only once it resolves.
    """

    id: int
    text: str
    source: str = ""
    kind: Literal["better", "cheaper_at_equal_quality"]
    candidate: str
    reference: list[str]
    role: Literal["claim", "control"] = "claim"
    metric: Optional[str] = Field(
        None, description="the metric this claim is tested on (default: the study's key metric)"
    )
    cost: str = "moe_mflops_per_audio_s"
    margin: float = Field(
        0.02, gt=0.0, description="equivalence margin (better) / quality margin (cheaper_at_equal_quality)"
    )
    also: list[str] = Field(
        default_factory=list, description="further metrics reported with the claim (e.g. the worst task)"
    )
    noninferior: list[str] = Field(
        default_factory=list,
        description="metrics the candidate must not lose by more than the margin for the claim to hold "
        "(e.g. the majority domain's, when the key metric is the minority's)",
    )


class Compact(_Strict):
    """What ``audiomoe demo`` changes."""

    steps: Optional[int] = Field(None, ge=1)
    seeds: Optional[int] = Field(None, ge=1)
    measure_batches: Optional[int] = Field(None, ge=1)
    train: dict[str, Any] = Field(
        default_factory=dict, description="training options changed in the compact form (merged over the study's)"
    )
    variants: Optional[list[str]] = Field(
        None, description="the variants the compact form runs (default: all); claims on the others say 'not measured'"
    )


class StudySpec(_Strict):
    """A study file (see the module doc)."""

    study: str
    description: str = ""
    seeds: int = Field(3, ge=1, le=100)
    steps: int = Field(200, ge=1)
    metric: str = "mean/accuracy"
    task_groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="name -> tasks: each run also gets '<name>/<metric>', the mean over those tasks (e.g. a domain)",
    )
    train: dict[str, Any] = Field(default_factory=dict)
    measure_batches: int = Field(4, ge=1, le=1000)
    compact: Compact = Field(default_factory=Compact)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    arms: dict[str, ArmSpec]
    claims: list[ClaimSpec] = Field(default_factory=list)


def builtin_studies() -> list[str]:
    """Names of the study files shipped in ``audiomoe/analysis/studies``."""
    return sorted(p.stem for p in STUDIES.glob("*.yaml"))


def find_study(name: str) -> Optional[Path]:
    """The study file ``name`` names: a built-in study, or a YAML path whose top level has ``arms``; else None."""
    if name in builtin_studies():
        return STUDIES / f"{name}.yaml"
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from audiomoe.core.safe_yaml import load_yaml_file

        data = load_yaml_file(str(path))
        if isinstance(data, dict) and "arms" in data:
            return path
    return None


def load_study(path: str | Path) -> StudySpec:
    """Read and validate a study file; every problem is reported with its key."""
    from audiomoe.core.safe_yaml import load_yaml_file

    data = load_yaml_file(str(path))
    if not isinstance(data, dict):
        raise AudioMoEError(f"study file '{path}' must hold a mapping with 'study' and 'arms'")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise AudioMoEError(f"study file '{path}' is not valid:\n" + "\n".join(lines)) from None
    _check(spec, path)
    return spec


def _check(spec: StudySpec, path: Any) -> None:
    for group, tasks in spec.task_groups.items():
        if not NAME_RE.match(group) or group in ("mean", "worst") or not tasks:
            raise AudioMoEError(
                f"study '{path}': task_groups.{group}: give a name of letters, digits, '_', '.', '-' (not 'mean' or "
                "'worst') and at least one task, e.g. task_groups: {speech: [language, speaker]}"
            )
    names: list[str] = []
    for arm, a in spec.arms.items():
        if not NAME_RE.match(arm):
            raise AudioMoEError(f"study '{path}': arm name '{arm}' must be letters, digits, '_', '.', '-'")
        for v in a.variants:
            if not NAME_RE.match(v):
                raise AudioMoEError(
                    f"study '{path}': arms.{arm}.variants: name '{v}' must be letters, digits, '_', '.', '-'"
                )
        if a.baseline is not None and a.baseline not in a.variants:
            raise AudioMoEError(
                f"study '{path}': arms.{arm}.baseline '{a.baseline}' is not one of its variants.{did_you_mean(a.baseline, a.variants)}"
            )
        names += list(a.variants)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AudioMoEError(
            f"study '{path}': variant names {dup} appear in more than one arm; variant names must be unique across arms"
        )
    for n in spec.compact.variants or []:
        if n not in names:
            raise AudioMoEError(
                f"study '{path}': compact.variants names '{n}', which is no arm's variant.{did_you_mean(n, names)}"
            )
    keep = set(spec.compact.variants or names)
    for arm, a in spec.arms.items():
        base = a.baseline or next(iter(a.variants))
        if keep & set(a.variants) and base not in keep:
            raise AudioMoEError(
                f"study '{path}': compact.variants keeps part of arm '{arm}' but not its baseline '{base}'; add it (or leave the whole arm out)"
            )
    for c in spec.claims:
        for n in [c.candidate, *c.reference]:
            if n not in names:
                raise AudioMoEError(
                    f"study '{path}': claim {c.id} names '{n}', which is no arm's variant.{did_you_mean(n, names)}"
                )


def recipe_exists(name: str) -> bool:
    """Whether ``audiomoe train NAME`` knows ``name`` as a recipe (asked of the registry and of ``audiomoe.train``)."""
    from audiomoe.core.registry import get_registry

    reg = get_registry()
    try:
        if reg.list_components("recipe", name):
            return True
    except Exception:  # noqa: BLE001 - no 'recipe' kind yet (issue 15)
        pass
    import importlib

    try:
        train = importlib.import_module("audiomoe.train")
    except Exception:  # noqa: BLE001 - any import failure means: no recipes to look in
        return False
    for attr in ("list_recipes", "recipe_names", "available_recipes"):
        fn = getattr(train, attr, None)
        if callable(fn):
            try:
                return name in {getattr(r, "name", r) for r in fn()}
            except Exception:  # noqa: BLE001 - a listing that fails cannot confirm the name
                return False
    return False


def plan_study(
    spec: StudySpec,
    root: str | Path,
    *,
    compact: bool = False,
    seeds: Optional[int] = None,
    steps: Optional[int] = None,
    exists: Any = recipe_exists,
) -> Plan:
    """The configs of ``spec`` (inline models written to ``root/specs``), skipping arms whose recipes are missing."""
    n_seeds = seeds or (spec.compact.seeds if compact and spec.compact.seeds else spec.seeds)
    n_steps = steps or (spec.compact.steps if compact and spec.compact.steps else spec.steps)
    batches = spec.compact.measure_batches if compact and spec.compact.measure_batches else spec.measure_batches
    root = Path(root)
    model_paths = {}
    if spec.models:
        import yaml

        (root / "specs").mkdir(parents=True, exist_ok=True)
        for name, body in spec.models.items():
            p = root / "specs" / f"{name}.yaml"
            write_text(p, yaml.safe_dump(body, sort_keys=False), what="study model spec")
            model_paths[name] = str(p)
    configs: list[Config] = []
    baselines, skipped, skipped_configs = {}, {}, {}
    arm_seeds, config_seeds = {}, {}
    chosen = set(spec.compact.variants) if compact and spec.compact.variants else None
    for arm, a in spec.arms.items():
        missing = [r for r in a.requires if not exists(r)]
        if missing:
            skipped[arm] = f"needs recipe(s) {', '.join(missing)}" + (f" ({a.placeholder})" if a.placeholder else "")
            skipped_configs.update({v: arm for v in a.variants})
            continue
        left_out = [v for v in a.variants if chosen is not None and v not in chosen]
        if left_out:  # the compact form (audiomoe demo) runs fewer configs; the full study runs these
            key = arm if len(left_out) == len(a.variants) else f"{arm} (compact)"
            skipped[key] = (
                f"{', '.join(left_out)} left out of the compact form (audiomoe demo); the full study (audiomoe ablate {spec.study}) runs {'them' if len(left_out) > 1 else 'it'}"
            )
            skipped_configs.update({v: key for v in left_out})
            if key == arm:
                continue
        variants, targets = [], {}
        for vname, v in a.variants.items():
            if vname in left_out:
                continue
            if isinstance(v, VariantSpec):
                variants.append((vname, v.set + (v.compact_set if compact else [])))
                if v.seeds is not None and not seeds and not compact:
                    config_seeds[vname] = list(range(v.seeds))
                if v.target:
                    targets[vname] = model_paths.get(v.target, v.target)
            else:
                variants.append((vname, v))
        target = model_paths.get(a.target or "", a.target or "")
        if not target and len(targets) < len(variants):
            raise AudioMoEError(
                f"study '{spec.study}': arm '{arm}' has no target; give arms.{arm}.target or a target per variant"
            )
        arm_steps = None if a.steps == "recipe" else (a.steps or n_steps)
        if compact and isinstance(a.steps, int) and spec.compact.steps:
            arm_steps = min(a.steps, spec.compact.steps)
        train = dict(spec.train if a.train is None else a.train)
        if compact and a.train is None:
            train.update(spec.compact.train)
        sets = a.set + (a.compact_set if compact else [])
        configs += expand(
            target, (), variants, overrides=sets, train=train, steps=arm_steps, arm=arm, variant_targets=targets
        )
        baselines[arm] = a.baseline or variants[0][0]
        if a.seeds is not None and not seeds and not compact:  # --seeds and the compact form set every arm's
            arm_seeds[arm] = list(range(a.seeds))
    return Plan(
        configs,
        list(range(n_seeds)),
        baselines,
        skipped,
        spec.metric,
        batches,
        skipped_configs,
        arm_seeds,
        task_groups={k: list(v) for k, v in spec.task_groups.items()},
        config_seeds=config_seeds,
    )
