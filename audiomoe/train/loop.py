"""``audiomoe.train.train``: train a preset with flat options (:class:`TrainConfig`), a one-stage recipe underneath.

Seeds: the spec's ``seed`` fixes the *initial parameters* (composing a spec twice gives the same
model); ``TrainConfig.seed`` (``train --seed``) fixes everything the run draws: the data stream,
the eval batches and the global torch RNG during training (dropout, router jitter, random
routers). Same spec + same options = the same run; a resumed run restores the RNG and the data
position, so it continues as if never stopped.

Every option is checked before anything is built (:meth:`TrainConfig.check`), the run directory
is created, locked and checked before training starts (``rundir.py``), and a model whose heads the
data cannot feed is refused instead of training a subset of its heads. Multi-stage training,
freezing, per-group learning rates and specialists are recipes (:mod:`audiomoe.train.recipe`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Optional, Sequence, get_args

from audiomoe.core.batch import AudioBatch
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.limits import MAX_BATCH_SIZE, MAX_LR, MAX_SEED, MAX_STEPS
from audiomoe.train.data import build_data
from audiomoe.train.evaluate import evaluate
from audiomoe.train.recipe import OptimSpec, Recipe, recipe_for_preset
from audiomoe.train.steploop import TrainingInterrupted
from audiomoe.train.trainer import RunOptions, run_recipe

__all__ = ["TrainConfig", "TrainingInterrupted", "evaluate", "train"]


@dataclass
class TrainConfig:
    """Knobs of the training loop (``audiomoe train --help`` describes each)."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    eval_every: int = 50
    eval_batches: int = 4
    out_dir: Optional[str] = None
    keep: int = 2
    seed: int = 0
    progress: bool = True
    save_every: int = 0
    log_every: int = 0
    resume: bool = False
    overwrite: bool = False
    data: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    grad_clip: Optional[float] = 1.0
    on_nonfinite: str = "stop"  # a NaN/inf gradient norm: stop, or skip the optimizer step (recipe optim.on_nonfinite)
    accumulation: int = 1
    warmup: Optional[int] = None  # None: 5% of the steps (the recipe's schedule.warmup)
    schedule: str = "cosine"
    logs: bool = False
    compile: bool = False
    expert_parallel: Optional[int] = None  # the recipe's distributed.expert_parallel (None: the spec's)
    fsdp: bool = False
    workers: int = 1  # data-loader worker processes per rank

    _INT_RANGES = {
        "steps": (1, MAX_STEPS),
        "batch_size": (1, MAX_BATCH_SIZE),
        "eval_every": (1, MAX_STEPS),
        "eval_batches": (0, 1000),
        "keep": (0, 1000),
        "seed": (0, MAX_SEED),
        "save_every": (0, MAX_STEPS),
        "log_every": (0, MAX_STEPS),
        "accumulation": (1, 1024),
        "warmup": (0, MAX_STEPS),
        "workers": (0, 256),
    }
    _OPTIONAL = ("warmup",)  # None is valid: the recipe decides

    def problems(self) -> list[str]:
        """Every bad option, as ``"name (value) must ..."``."""
        out = []
        for name, (lo, hi) in self._INT_RANGES.items():
            v = getattr(self, name)
            if v is None and name in self._OPTIONAL:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                out.append(f"{name} ({v!r}) must be an integer in [{lo}, {hi}]")
        for name, lo_open, hi in (("lr", True, MAX_LR), ("weight_decay", False, 1.0)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= hi
            if not ok or (v <= 0 if lo_open else v < 0):
                out.append(f"{name} ({v!r}) must be a finite number in {'(0' if lo_open else '[0'}, {hi}]")
        if self.expert_parallel is not None and (
            isinstance(self.expert_parallel, bool)
            or not isinstance(self.expert_parallel, int)
            or self.expert_parallel < 1
        ):
            out.append(f"expert_parallel ({self.expert_parallel!r}) must be an integer >= 1 (or None: the spec's)")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            out.append(f"grad_clip ({self.grad_clip!r}) must be a number > 0 (or None: no clipping)")
        nonfinite = get_args(OptimSpec.model_fields["on_nonfinite"].annotation)  # the recipe's choices, declared there
        named = {"precision": ("fp32", "bf16"), "schedule": ("constant", "linear", "cosine"), "on_nonfinite": nonfinite}
        for name, choices in named.items():
            if getattr(self, name) not in choices:
                out.append(f"{name} ({getattr(self, name)!r}) must be one of {', '.join(choices)}")
        if self.resume and self.overwrite:
            out.append("resume and overwrite exclude each other (continue a run, or delete it)")
        if (self.resume or self.overwrite) and not self.out_dir:
            out.append("resume / overwrite need out_dir (--out), the run directory")
        return out

    def check(self) -> None:
        """Raise :class:`AudioMoEError` listing every bad option (before anything is built)."""
        bad = self.problems()
        if bad:
            raise AudioMoEError("bad training options: " + "; ".join(bad))

    def recipe_fields(self) -> dict[str, Any]:
        """These options as recipe sections (everything but the model and the steps)."""
        return {
            "data": self.data,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "precision": self.precision,
            "compile": self.compile,
            "optim": {
                "lr": self.lr,
                "weight_decay": self.weight_decay,
                "grad_clip": self.grad_clip,
                "accumulation": self.accumulation,
                "on_nonfinite": self.on_nonfinite,
            },
            "schedule": {"kind": self.schedule, "warmup": self.warmup},
            "eval": {"every": self.eval_every, "batches": self.eval_batches},
            "checkpoint": {"every": self.save_every, "keep": self.keep},
            "log": {"jsonl": self.logs, "tensorboard": self.logs},
            "distributed": {"expert_parallel": self.expert_parallel, "fsdp": self.fsdp},
        }


def _merge_changed(raw: dict[str, Any], new: dict[str, Any], default: dict[str, Any]) -> None:
    """Write into ``raw`` every leaf of ``new`` that differs from ``default`` (an option the caller set)."""
    for key, value in new.items():
        if isinstance(value, dict):
            _merge_changed(raw.setdefault(key, {}), value, default[key])
        elif value != default[key]:
            raw[key] = value


def _default_data(model: Any, cfg: TrainConfig) -> tuple[Iterator[AudioBatch], list[AudioBatch]]:
    """The data used when none is passed, by ``cfg.data``: ``builtin`` (the built-in corpus, made once
    into the cache), ``tones`` (synthetic pitch classes), a manifest path, or ``auto``: the corpus
    when every head is named after one of its tasks, else tones."""
    return build_data(
        model,
        cfg.data,
        None,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        eval_batches=cfg.eval_batches,
        progress=cfg.progress,
    )


def train(
    preset: Any = None,
    overrides: Sequence[str] = (),
    config: Optional[TrainConfig] = None,
    data: Optional[Iterator[AudioBatch]] = None,
    eval_data: Optional[Sequence[AudioBatch]] = None,
) -> dict[str, Any]:
    """Compose ``preset`` and train it; without ``data``, on ``config.data`` (auto: the built-in corpus or tones).

    With ``config.out_dir`` the run directory is locked for the run and must not hold another run
    unless ``config.resume`` (continue from its last good checkpoint: model, optimizer, step, RNG,
    data position) or ``config.overwrite``. Returns a summary: steps, final loss, eval metrics
    before and after, checkpoint path, time. Ctrl-C raises :class:`TrainingInterrupted` naming
    the last good checkpoint.
    """
    cfg = config or TrainConfig()
    cfg.check()
    if preset is None and not cfg.out_dir:
        raise AudioMoEError("give a preset or spec to train (or --resume a run directory that has one)")
    recipe = None if preset is None else recipe_for_preset(preset, overrides, steps=cfg.steps, **cfg.recipe_fields())

    def adjust(
        stored: Recipe,
    ) -> Recipe:  # a resumed run: its own recipe, with the options set away from their defaults
        raw, base = stored.model_dump(), TrainConfig()
        _merge_changed(raw, cfg.recipe_fields(), base.recipe_fields())
        if cfg.steps != base.steps and len(raw["stages"]) == 1:
            raw["stages"][0]["steps"] = cfg.steps
        return Recipe.model_validate(raw)

    opts = RunOptions(
        out_dir=cfg.out_dir,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        device=cfg.device,
        progress=cfg.progress,
        print_every=cfg.log_every,
        data=data,
        eval_data=eval_data,
        adjust=adjust,
        workers=cfg.workers,
        config={k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite")},
    )
    result = run_recipe(recipe, opts)
    result["config"] = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    return result
