"""Training recipes: what a run trains, on which data, in which stages, with which optimizer.

A recipe is a YAML mapping validated strictly (pydantic, ``extra="forbid"``); every problem is
reported at once under its dotted key (``stages.1.optim.lr``). Built-in recipes live in
``audiomoe/recipes/<name>.yaml`` and are found by name like presets; a plain preset is a one-stage
recipe (:func:`recipe_for_preset`). Sketch (every section but ``model`` and ``stages`` optional)::

    model: {preset: tiny-unimoe-corpus, overrides: [backbone.moe.router.p=0.6]}   # or spec: {...}
    data: builtin                 # auto | builtin | tones | a manifest path | a data spec mapping
    batch_size: 16                # global items per forward (split over processes)
    optim: {lr: 3.0e-3, betas: [0.9, 0.999], weight_decay: 0.01, grad_clip: 1.0, accumulation: 1,
            lr_mult: {router: 2.0}, on_nonfinite: stop}         # or skip: a NaN/inf gradient skips the step
    schedule: {warmup: 10, kind: cosine, min_lr_ratio: 0.1}     # constant | linear | cosine
    precision: fp32               # or bf16 (autocast)
    eval: {every: 50, batches: 4}
    log: {every: 1, tensorboard: true, routing_every: 25}
    distributed: {expert_parallel: 2, fsdp: true}   # under torchrun (--nproc N); see layout.py
    domains: {speech: {tasks: [language], proportion: 8}, sound: {tasks: [event], proportion: 1}}  # domains.py
    stages:
      - {name: foundation, steps: 100, foundation: {}, data: {temperature: 0.0}}   # a shared dense model
      - {name: specialists, steps: 100, init: {from_checkpoint: "stage:foundation"},
         specialists: {members: [{name: speech, data: {tasks: [language]}}, ...]}}    # {}: one per domain
      - {name: warmup, steps: 50, init: {from_specialists: ["stage:specialists"]},
         train: [router, shared_experts], data: {balanced: 20}}
      - {name: joint, steps: 200, aux_weight: {start: 0.025, end: 0.001}}

Each stage has its own optimizer (rebuilt at the stage start over the tensors it trains: frozen
tensors are not in it, so they get no update, no weight decay and no moments), its own schedule
(``schedule`` / ``optim`` override the recipe's for that stage) and optionally an ``init`` run
before its first step (``upcycle: stage:foundation``: the MoE from the dense foundation alone). The
step counter runs across stages (checkpoint ``step-N`` is global). The section specs (``optim``, ``schedule``,
...) are in :mod:`audiomoe.train.recipe_sections`, the stage's ``init`` / ``data`` / specialists specs in
:mod:`audiomoe.train.stage_specs`; both are re-exported here.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from audiomoe.core.errors import AudioMoEError, ConfigError, ConfigProblem, did_you_mean
from audiomoe.core.limits import MAX_BATCH_SIZE, MAX_SEED, MAX_STEPS
from audiomoe.train.config_keys import problems_of, set_key
from audiomoe.train.domains import DomainSpec, apply_domains

# re-exported: the section specs were first defined here, and the trainer's modules import them from here
from audiomoe.train.recipe_sections import (  # noqa: F401 - re-exported: recipes' public spec names
    AUTO_WARMUP,
    AuxWeightSpec,
    CheckpointSpec,
    DistributedSpec,
    EvalSpec,
    HealthSpec,
    LogSpec,
    OptimOverride,
    OptimSpec,
    ScheduleSpec,
)

# re-exported: the stage specs were first defined here
from audiomoe.train.stage_specs import FoundationSpec, InitSpec, SpecialistMember, SpecialistsSpec, StageData  # noqa: F401 - re-exported: recipes' public spec names
from audiomoe.train.stage_specs import Strict as _Strict
from audiomoe.train.weak_pretrain import WeakSpecialistsSpec

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
#: Top-level recipe keys that ``--set`` addresses; any other ``--set`` key is a model override.
RECIPE_KEYS = (
    "data",
    "batch_size",
    "optim",
    "schedule",
    "precision",
    "eval",
    "log",
    "checkpoint",
    "stages",
    "compile",
    "activation_checkpointing",
    "device",
    "distributed",
    "domains",
)


class ModelSection(_Strict):
    """The model: a preset name (or model-spec YAML path) or an inline spec, plus ``key=value`` overrides."""

    preset: Optional[str] = Field(None, description="preset name or spec YAML path")
    spec: Optional[dict[str, Any]] = Field(None, description="an inline model spec (d_model, encoder, backbone, tasks)")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides, as the CLI's --set")
    preset_overrides: list[str] = Field(
        default_factory=list,
        description="overrides written by the preset's own plugin (applied first; their names mean its components)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSection":
        if (self.preset is None) == (self.spec is None):
            raise ValueError("give exactly one of 'preset' and 'spec'")
        return self

    def source(self) -> Any:
        """What :func:`audiomoe.compose` takes."""
        return self.preset if self.preset is not None else self.spec

    def resolve(self) -> Any:
        """The resolved model spec (:func:`audiomoe.core.composer.resolve`)."""
        from audiomoe.core.composer import resolve

        return resolve(self.source(), self.overrides, authored=self.preset_overrides)


class StageSpec(_Strict):
    """One stage: a name, its steps, its data, what trains, its optimizer/schedule/aux weight, its init."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    steps: int = Field(ge=1, le=MAX_STEPS)
    data: Optional[StageData] = None
    train: list[str] = Field(default_factory=lambda: ["all"], description="groups or module globs that train")
    freeze: list[str] = Field(default_factory=list, description="groups or globs removed from 'train'")
    optim: Optional[OptimOverride] = Field(None, description="changes to the recipe's optim for this stage")
    schedule: Optional[ScheduleSpec] = None
    aux_weight: Optional[AuxWeightSpec] = None
    init: Optional[InitSpec] = None
    specialists: Optional[SpecialistsSpec] = None
    foundation: Optional[FoundationSpec] = Field(
        None, description="this stage trains a shared dense foundation (a run of its own)"
    )
    weak_specialists: Optional[WeakSpecialistsSpec] = Field(None, description="first pretrain MoWE weak encoders")

    @model_validator(mode="after")
    def _checks(self) -> "StageSpec":
        if self.specialists is not None and self.init is not None and self.init.from_checkpoint is None:
            raise ValueError(
                "a specialists stage starts its members from one dense checkpoint: only init.from_checkpoint"
            )
        if self.foundation is not None and (self.specialists is not None or self.init is not None):
            raise ValueError("a foundation stage trains a new dense model: it takes no 'init' and no 'specialists'")
        return self

    @property
    def side_run(self) -> bool:
        """True when this stage trains models of its own (specialists, a foundation), not the main model."""
        return self.specialists is not None or self.foundation is not None


class Recipe(_Strict):
    """A whole recipe (see the module docstring)."""

    name: Optional[str] = None
    summary: str = ""
    model: ModelSection
    data: Union[str, dict[str, Any]] = "auto"
    batch_size: int = Field(16, ge=1, le=MAX_BATCH_SIZE, description="global items per forward (split over processes)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="data order, eval batches, dropout and router noise")
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    precision: Literal["fp32", "bf16"] = "fp32"
    eval: EvalSpec = Field(default_factory=EvalSpec)
    log: LogSpec = Field(default_factory=LogSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    compile: bool = Field(False, description="torch.compile the backbone (and encoder) blocks")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none",
        description="recompute each backbone block and encoder layer in backward (full), only its cheap ops "
        "(selective: matmul and attention outputs kept), or keep every activation (none); see docs/training.md",
    )
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    domains: Optional[dict[str, DomainSpec]] = Field(
        None, description="domain -> {tasks, proportion}: the mix of every stage naming no sampling of its own"
    )
    stages: list[StageSpec] = Field(min_length=1)

    @field_validator("data")
    @classmethod
    def _absolute_data(cls, v: Union[str, dict[str, Any]]) -> Union[str, dict[str, Any]]:
        # a manifest / data file is found from the working directory of the command given it: recorded absolute,
        # eval, report and resume find it from anywhere
        return (
            os.path.abspath(os.path.expanduser(v))
            if isinstance(v, str) and v not in ("auto", "builtin", "tones")
            else v
        )

    @model_validator(mode="after")
    def _stage_refs(self) -> "Recipe":
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique: {', '.join(dup)}")
        for i, st in enumerate(self.stages):
            init = st.init
            refs = [(r, "specialists") for r in (init.from_specialists or [])] if init else []
            refs += [(r, "foundation") for r in (init.from_checkpoint, init.upcycle) if r] if init else []
            for ref, kind in refs:
                if ref.startswith("stage:"):
                    target = ref[len("stage:") :]
                    choices = [s.name for s in self.stages[:i] if getattr(s, kind) is not None]
                    if target not in choices:
                        raise ValueError(
                            f"stages.{i}.init: '{ref}' names no earlier {kind} stage "
                            f"(earlier: {', '.join(choices) or 'none'}){did_you_mean(target, choices)}"
                        )
        apply_domains(self)
        return self

    def stage_optim(self, stage: StageSpec) -> OptimSpec:
        """The optimizer options of ``stage``: the recipe's, updated by the stage's."""
        changes = {k: v for k, v in stage.optim.model_dump().items() if v is not None} if stage.optim else {}
        return OptimSpec.model_validate({**self.optim.model_dump(), **changes})

    def main_stages(self) -> list[tuple[int, StageSpec, int]]:
        """``(index, stage, first global step - 1)`` of the stages that train the main model."""
        out, offset = [], 0
        for i, st in enumerate(self.stages):
            if not st.side_run:
                out.append((i, st, offset))
                offset += st.steps
        return out

    def total_steps(self) -> int:
        """Optimizer steps of the main model over every stage."""
        return sum(st.steps for _, st, _ in self.main_stages())


def list_recipes() -> list[str]:
    """Names of the built-in recipes."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def find_recipe(name: str) -> Optional[Path]:
    """The YAML of a built-in recipe named ``name``, a recipe YAML path, or None when ``name`` is neither."""
    if (RECIPE_DIR / f"{name}.yaml").is_file() and "/" not in name:
        return RECIPE_DIR / f"{name}.yaml"
    if name.endswith((".yaml", ".yml")) and os.path.isfile(name):
        from audiomoe.core.safe_yaml import load_yaml_file

        data = load_yaml_file(name, "recipe")
        return Path(name) if isinstance(data, Mapping) and "stages" in data else None
    return None


def load_recipe(source: Union[str, os.PathLike, Mapping[str, Any]], sets: Sequence[str] = ()) -> Recipe:
    """Validate a recipe (built-in name, YAML path or mapping) with ``--set`` overrides applied.

    ``sets`` whose first key is a recipe section (:data:`RECIPE_KEYS`) change the recipe; the
    others are appended to ``model.overrides``. Raises :class:`ConfigError` listing every problem.
    """
    from audiomoe.core.safe_yaml import load_yaml_file

    if isinstance(source, Mapping):
        raw, label = copy.deepcopy(dict(source)), "recipe"
    else:
        path = find_recipe(os.fspath(source))
        if path is None:
            known = list_recipes()
            raise AudioMoEError(
                f"unknown recipe '{source}'.{did_you_mean(os.fspath(source), known)} Built-in recipes: {', '.join(known)}; "
                "or give a recipe YAML (a mapping with 'model' and 'stages')"
            )
        raw, label = load_yaml_file(path, "recipe"), f"recipe '{source}'"
        if not isinstance(raw, Mapping):
            raise AudioMoEError(f"{label} must hold a mapping (model, stages, ...), not {type(raw).__name__}")
        raw = dict(raw)
        if path.parent == RECIPE_DIR:
            _own_preset(raw)
    return _validated(raw, sets, label)


def _own_preset(raw: dict[str, Any]) -> None:
    """A built-in recipe's preset is the built-in one, even when a plugin registers another of that name."""
    from audiomoe.core.registry import get_registry

    model = raw.get("model")
    name = model.get("preset") if isinstance(model, dict) else None
    if isinstance(name, str) and ":" not in name:
        providers = get_registry().providers("preset", name)
        if len(providers) > 1 and "builtin" in providers:
            model["preset"] = f"builtin:{name}"


def recipe_for_preset(preset: Any, overrides: Sequence[str] = (), *, steps: int, **fields: Any) -> Recipe:
    """A plain preset (or spec) as a one-stage recipe named ``train`` that trains everything.

    ``overrides`` are split as :func:`load_recipe` splits ``--set``: a recipe section's
    (``compile=true``, ``optim.lr=...``) set the recipe, after ``fields``; the others the model.
    """
    source = {"preset": preset} if isinstance(preset, (str, os.PathLike)) else {"spec": dict(preset)}
    raw = {
        "model": {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in source.items()},
        "stages": [{"name": "train", "steps": steps}],
        **copy.deepcopy(fields),
    }
    return _validated(raw, overrides, "training options")


def _validated(raw: dict[str, Any], sets: Sequence[str], label: str) -> Recipe:
    """``raw`` with ``sets`` applied (recipe sections set, the rest appended to ``model.overrides``), validated."""
    from audiomoe.core.overrides import parse_override

    problems: list[ConfigProblem] = []
    for text in sets:
        key, value = parse_override(text)
        if key.split(".")[0] in RECIPE_KEYS:
            err = set_key(raw, key, value)
            if err:
                problems.append(ConfigProblem(key, err + " (from --set)", value, True))
        else:
            model = raw.setdefault("model", {})
            if isinstance(model, dict):
                model["overrides"] = list(model.get("overrides") or []) + [text]
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += problems_of(exc, Recipe)
        recipe = None
    if problems or recipe is None:
        raise ConfigError(problems, source=label)
    return recipe
