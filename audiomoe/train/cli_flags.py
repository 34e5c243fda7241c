"""How ``audiomoe train``'s command line becomes a recipe: the flags that map onto recipe keys, a resumed run's
stored recipe with only what the new command line changes, and a preset run's flat :class:`TrainConfig`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from audiomoe.core.errors import AudioMoEError

#: (flag dest, legacy default, recipe path) for options a recipe also has
_FLAGS = [
    ("steps", 200, None),
    ("batch_size", 16, "batch_size"),
    ("lr", 3e-3, "optim.lr"),
    ("weight_decay", 0.01, "optim.weight_decay"),
    ("eval_every", 50, "eval.every"),
    ("eval_batches", 4, "eval.batches"),
    ("seed", 0, "seed"),
    ("save_every", 0, "checkpoint.every"),
    ("keep", 2, "checkpoint.keep"),
    ("data", "auto", "data"),
    ("precision", "fp32", "precision"),
    ("grad_clip", 1.0, "optim.grad_clip"),
    ("accumulation", 1, "optim.accumulation"),
    ("warmup", None, "schedule.warmup"),
    ("schedule", "cosine", "schedule.kind"),
    ("expert_parallel", None, "distributed.expert_parallel"),
    ("fsdp", False, "distributed.fsdp"),
]


def _apply_flags(recipe: Any, args: argparse.Namespace) -> Any:
    """The recipe with every option given on the command line written into it."""
    from audiomoe.train.recipe import Recipe

    raw = recipe.model_dump()
    for dest, _, path in _FLAGS:
        value = getattr(args, dest)
        if value is None:
            continue
        if dest == "steps":
            main = [s for s in raw["stages"] if s.get("specialists") is None]
            if len(raw["stages"]) != 1:
                raise AudioMoEError(
                    f"--steps sets the steps of a one-stage run; this recipe has {len(raw['stages'])} stages "
                    f"({', '.join(s['name'] for s in raw['stages'])}): use --set stages.NAME.steps=N"
                )
            main[0]["steps"] = value
            continue
        node = raw
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    if args.compile:
        raw["compile"] = True
    if args.no_logs:
        raw["log"].update(jsonl=False, tensorboard=False)
    return Recipe.model_validate(raw)


def _stored_recipe(out: str) -> Any:
    """The recipe a run directory recorded (every run records one, a preset's as one stage), or None."""
    from audiomoe.train.recipe import Recipe

    info = Path(out) / "run.json"
    try:
        raw = json.loads(info.read_text(encoding="utf-8")).get("recipe") if info.is_file() else None
        return Recipe.model_validate(raw) if raw else None
    except ValueError:
        return None


def _resumed(stored: Any, args: argparse.Namespace) -> Any:
    """A resumed run's own recipe (its data, optimizer, schedule, ...) with only what this command line gave changed."""
    from audiomoe.core.composer import resolve
    from audiomoe.core.overrides import parse_override
    from audiomoe.train.recipe import RECIPE_KEYS, load_recipe

    sets = [t for t in args.set if parse_override(t)[0].split(".")[0] in RECIPE_KEYS]
    model_sets = [t for t in args.set if t not in sets]
    if args.target is not None:  # the model named again: it must be the run's
        if resolve(args.target, model_sets).to_dict() != stored.model.resolve().to_dict():
            raise AudioMoEError(
                f"'{args.resume}' was trained from a different spec than {args.target!r} with these --set overrides; "
                "resume without PRESET/--set to continue it, or use --overwrite to start over"
            )
    elif model_sets:
        raise AudioMoEError(
            f"--set {model_sets[0]} changes the model; a resumed run keeps its model (recipe keys "
            f"{', '.join(RECIPE_KEYS)} may change), or use --overwrite to start over"
        )
    return _apply_flags(load_recipe(stored.model_dump(), sets) if sets else stored, args)


def _train_config(args: argparse.Namespace, out: Any, main: bool) -> Any:
    """The flat options of a preset run (:class:`audiomoe.train.TrainConfig`) from the command line."""
    from audiomoe.train import TrainConfig

    flags = {
        dest: getattr(args, dest) for dest, _, _ in _FLAGS if getattr(args, dest) is not None
    }  # else TrainConfig's defaults
    return TrainConfig(
        **flags,
        out_dir=out,
        progress=not args.quiet and main,
        log_every=args.log_every or 0,
        resume=bool(args.resume),
        overwrite=args.overwrite,
        device=args.device,
        logs=not args.no_logs,
        compile=args.compile,
        workers=args.workers,
    )
