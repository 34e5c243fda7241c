"""The engine behind ``audiomoe train``: a recipe's stages, one optimizer step at a time, resumable exactly.

:func:`run_recipe` opens (rank 0) and locks the run directory, builds the model (or loads the
last good checkpoint), then runs each stage (:mod:`.stages` for inits and specialists, the
per-step work in :mod:`.steploop`, checkpoints by :mod:`.checkpointer`; the stages share a typed
:class:`~audiomoe.train.run_state.RunState`). Everything a step depends on is in each checkpoint:
weights (with the routers' schedule positions), the stage's AdamW state, the global and stage
step (the lr is a function of it), every rank's RNG state and data-sampler position, and the tasks
seen; nothing is pickled. So a run killed at any moment resumes from its last complete checkpoint
and ends with the weights of an unbroken run (same number of processes; bit-identical on CPU).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from audiomoe.core.batch import AudioBatch
from audiomoe.core.composer import build_meta, build_model, check_size, resolve
from audiomoe.core.errors import AudioMoEError
from audiomoe.train.checkpoint import load_checkpoint
from audiomoe.train.checkpointer import Checkpointer
from audiomoe.train.distributed import Dist, setup
from audiomoe.train.evaluate import evaluate
from audiomoe.train.heldout import final_score
from audiomoe.train.layout import Layout, plan_layout
from audiomoe.train.progress import Progress
from audiomoe.train.recipe import ModelSection, Recipe
from audiomoe.train.run_state import RunContext
from audiomoe.train.rundir import RUN_FILE, RunDir, open_run_dir, resume_target
from audiomoe.train.stages import check_domains, run_foundation, run_specialists
from audiomoe.train.steploop import StageRun, TrainingInterrupted


@dataclass
class RunOptions:
    """How to run a recipe (not what: that is the recipe)."""

    out_dir: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    print_every: int = 0
    workers: int = 1
    data: Optional[Iterator[AudioBatch]] = None  # the caller's batches (one-stage runs)
    eval_data: Optional[Sequence[AudioBatch]] = None
    config: dict[str, Any] = field(default_factory=dict)  # recorded in run.json / the summary
    adjust: Optional[Callable[[Recipe], Recipe]] = None  # applied to a recipe read back from run.json
    spec_given: bool = True  # the recipe's model was given now (not read back): checked against the checkpoint


def memory_check(n_params: int) -> None:
    """Refuse a model whose weights + grads + AdamW moments exceed this machine's memory."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return
    need = n_params * 4 * 4
    if need > ram:
        raise AudioMoEError(
            f"training {n_params:,} parameters needs about {need / 2**30:,.1f} GiB (weights, gradients, AdamW state) "
            f"but this machine has {ram / 2**30:,.1f} GiB; use a smaller spec"
        )


def _collective(dist: Dist, fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on rank 0 (others get None); if it fails there, every rank stops."""
    result, error = None, None
    if dist.main:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = exc
    if not dist.all_ok(error is None):
        if error is not None:
            raise error
        raise AudioMoEError(f"rank 0 failed while {what}; its message says why")
    return result


def _recipe_from_run(path: Path, opts: RunOptions) -> Recipe:
    info = json.loads((path / RUN_FILE).read_text(encoding="utf-8")) if (path / RUN_FILE).is_file() else {}
    if "recipe" in info:
        recipe = Recipe.model_validate(info["recipe"])
    elif "spec" in info:  # a run of an older version: a one-stage recipe over its spec
        from audiomoe.train.recipe import recipe_for_preset

        recipe = recipe_for_preset(info["spec"], (), steps=int((info.get("config") or {}).get("steps", 1)))
    else:
        raise AudioMoEError("give a preset or spec to train (or --resume a run directory that has one)")
    return opts.adjust(recipe) if opts.adjust else recipe


def _model(
    recipe: Recipe,
    resume_from: Optional[Path],
    opts: RunOptions,
    where: str,
    world: int,
    device: Optional[torch.device] = None,
) -> tuple[Any, Layout]:
    """The model (new, or the checkpoint's) built for the recipe's process layout, and that layout.

    ``model.spec`` stays the spec given (without the layout's ``expert_parallel``), so checkpoints
    and ``run.json`` are layout-free: they load in one process and resume at another layout.
    """
    layouts: list[Layout] = []
    device = device or torch.device("cpu")  # where a meta-built model's shards are materialised

    def for_layout(spec: dict[str, Any]) -> dict[str, Any]:  # checked before anything is built
        layouts.append(plan_layout(recipe.distributed, resolve(spec).to_dict(), world))
        return layouts[-1].build_spec(resolve(spec).to_dict())

    if resume_from is not None:
        model = _meta_resume(resume_from, for_layout, layouts, device)
        if model is None:
            model = load_checkpoint(resume_from, build_spec=for_layout)
        if opts.spec_given and recipe.model.resolve().to_dict() != model.spec:
            raise AudioMoEError(
                f"'{where}' was trained from a different spec than {recipe.model.preset or 'the given spec'!r} with these --set overrides; "
                "resume without PRESET/--set to continue it, or use --overwrite to start over"
            )
    else:
        resolved = recipe.model.resolve()
        built = for_layout(resolved.to_dict())
        memory_check(check_size(build_meta(resolved)))
        first = recipe.main_stages()[0][1] if recipe.main_stages() else None
        # a first stage with an init (from_checkpoint, from_specialists) runs it on the full model: build that
        meta = None if first is None or first.init is not None else layouts[-1].build_sharded(resolve(built), device)
        model = (
            meta if meta is not None else build_model(resolve(built) if layouts[-1].expert_parallel > 1 else resolved)
        )
        model.spec = resolved.to_dict()
    return model, layouts[-1]


def _meta_resume(path: Path, for_layout: Callable, layouts: list, device: torch.device) -> Any:
    """A sharded run resumed at a meta-init layout: built on ``meta``, sharded, only this rank's rows read; else None."""
    from audiomoe.core.safe_yaml import load_yaml_file
    from audiomoe.train.checkpoint import resolve_checkpoint

    p = resolve_checkpoint(path)
    spec = load_yaml_file(p / "spec.yaml", "checkpoint spec")
    if not isinstance(spec, dict):
        return None  # load_checkpoint names the problem
    built = for_layout(spec)
    model = layouts[-1].build_sharded(resolve(built), device, checkpoint=str(p / "model.safetensors"))
    if model is not None:
        model.spec = resolve(spec).to_dict()
    return model


def run_recipe(recipe: Optional[Recipe], opts: RunOptions) -> dict[str, Any]:
    """Run ``recipe`` (or the one recorded in ``opts.out_dir`` when resuming with ``recipe=None``); return the summary."""
    dist = setup(opts.device)
    run: Optional[RunDir] = None
    try:
        root, at = (Path(opts.out_dir) if opts.out_dir else None), None
        if root is not None and opts.resume:  # --resume RUN/step-N continues RUN from that checkpoint
            root, at = resume_target(root)
        if root is not None:
            run = _collective(
                dist,
                lambda: open_run_dir(root, resume=opts.resume, overwrite=opts.overwrite, at=at),
                "opening the run directory",
            )
        resume_from = Checkpointer.choose(dist, run, root, at, opts.resume)
        if recipe is None:
            if root is None:
                raise AudioMoEError("give a recipe or preset to train (or --resume DIR)")
            recipe = _recipe_from_run(root, opts)
            opts.spec_given = False
        with torch.random.fork_rng(devices=[]):  # the run's RNG use never leaks into the caller's
            torch.manual_seed(recipe.seed + dist.rank)
            return _run(recipe, opts, dist, run, root, resume_from)
    finally:
        if run is not None:
            run.close()
        dist.close()


def _run(
    recipe: Recipe,
    opts: RunOptions,
    dist: Dist,
    run: Optional[RunDir],
    root: Optional[Path],
    resume_from: Optional[Path],
) -> dict[str, Any]:
    model, layout = _model(recipe, resume_from, opts, str(root), dist.world, dist.device)
    spec = model.spec
    recipe = recipe.model_copy(update={"model": ModelSection(spec=spec)})  # what resumes build: the spec trained
    checkpointer = Checkpointer(dist, run, root, resume_from, model, layout, recipe.checkpoint)
    state, start, total = checkpointer.state, checkpointer.start, recipe.total_steps()
    if resume_from is not None and start >= total:
        raise AudioMoEError(
            f"'{root}' is already at step {start}; ask for more --steps (total) to continue it, "
            "or give a stage more steps (--set stages.NAME.steps=N)"
        )
    check_domains(recipe, model.task_names)
    built = {n for n, p in model.named_parameters() if p.requires_grad}
    model.to(dist.device)
    checkpointer.restore_rng(recipe.seed)
    if recipe.activation_checkpointing != "none":  # before compile, and before the stages shard (FSDP2) or wrap (DDP)
        from audiomoe.train.act_ckpt import apply_activation_checkpointing

        apply_activation_checkpointing(model, recipe.activation_checkpointing)
    if recipe.compile:
        for part in (model.backbone, model.encoder):
            if part is not None:
                part.compile(dynamic=True)
    bar = Progress(total, start, ("auto" if opts.progress else "off") if dist.main else "off", opts.print_every)
    if run is not None and run.note:  # latest was missing or damaged: an older checkpoint was taken
        bar.note(f"warning: {run.note}")
        state.warnings.append({"step": start, "warning": run.note})
    if resume_from is not None:
        bar.note(f"resuming {root} from {resume_from.name} (step {start})")
    started = [run is None]

    def start_run() -> None:  # the run really starts (model built, data checked): record it
        if not started[0] and run is not None:
            run.start(spec=spec, config=opts.config)
            run.info["recipe"] = json.loads(recipe.model_dump_json())
            run.write_info()
        started[0] = True

    t0 = time.perf_counter()
    summary: dict[str, Any] = {"recipe": recipe.name, "start_step": start, "stages": [], "warnings": []}
    ctx = RunContext(recipe, model, dist, layout, root, opts, bar, built, checkpointer, state, start_run)
    try:
        summary["stages"] = _stages(ctx)
    except KeyboardInterrupt as exc:
        bar.close()
        raise TrainingInterrupted(getattr(exc, "step", state.step), checkpointer.last_good()) from None
    finally:
        bar.close()
        if state.log is not None:
            state.log.close()
    dist.barrier()
    return _finish(ctx, run, summary, t0)


def _stages(ctx: RunContext) -> list[dict[str, Any]]:
    """Every stage of the recipe not finished yet, in order: side runs (specialists, a foundation) and the main model's."""
    recipe, reports = ctx.recipe, []
    for idx, st in enumerate(recipe.stages):
        if st.side_run:  # specialists / a foundation: dense models trained as runs of their own
            if ctx.checkpointer.trained_past(idx):
                continue  # the main model has trained past this stage: its side runs are done
            ctx.start_run()
            reports.append(_side_run(ctx, idx))
            continue
        first = next(off for i, s, off in recipe.main_stages() if i == idx)
        if ctx.state.start >= first + st.steps:
            continue
        reports.append(StageRun(ctx, idx, first).run())
    return reports


def _side_run(ctx: RunContext, idx: int) -> dict[str, Any]:
    """Stage ``idx``'s specialists or foundation, each a one-stage run in a directory of its own."""
    st, opts = ctx.recipe.stages[idx], ctx.opts

    def one(sub: Recipe, d: Path, resume: bool) -> dict[str, Any]:
        what = "foundation" if st.foundation is not None else f"specialist '{d.name}'"
        ctx.bar.note(f"stage {idx} '{st.name}': {what} ({sub.stages[0].steps} steps) into {d}")
        o = RunOptions(
            out_dir=str(d),
            resume=resume,
            device=opts.device,
            progress=opts.progress,
            print_every=opts.print_every,
            workers=opts.workers,
        )
        return run_recipe(sub, o)

    if st.foundation is None:
        return {"name": st.name, "specialists": run_specialists(ctx.recipe, idx, ctx.root, ctx.model.spec, one)}
    device = str(ctx.dist.device) if ctx.dist.world == 1 else None  # a stored foundation is one process's
    return {"name": st.name, "foundation": run_foundation(ctx.recipe, idx, ctx.root, ctx.model.spec, one, device)}


def _finish(ctx: RunContext, run: Optional[RunDir], summary: dict[str, Any], t0: float) -> dict[str, Any]:
    """The run summary (the final held-out score when the recipe asks), written to ``summary.json`` by rank 0."""
    recipe, model, dist, state, opts = ctx.recipe, ctx.model, ctx.dist, ctx.state, ctx.opts
    unfed = [n for n in model.task_names if n not in state.fed]
    if unfed and opts.data is not None:  # the caller's data never named these heads: say so
        warnings.warn(
            f"the training data never had an item for head(s) {unfed}: they did not train; "
            "give batches for every task or drop those heads (tasks.NAME=null)",
            RuntimeWarning,
            stacklevel=5,
        )
    summary.update(
        {
            "untrained_heads": unfed,
            "steps": recipe.total_steps(),
            "final_loss": state.loss,
            "eval_before": state.before or {},
            "eval_after": state.history[-1] if state.history else {},
            "eval_history": list(state.history),
            "checkpoint": str(state.checkpoint) if state.checkpoint else None,
            "seconds": round(time.perf_counter() - t0, 2),
            "processes": dist.world,
            "device": str(dist.device),
            "layout": ctx.layout.describe(),
            "config": opts.config,
        }
    )
    summary["warnings"] = state.warnings
    summary["skipped_steps"] = state.skipped  # steps skipped for a NaN/inf gradient norm (optim.on_nonfinite)
    if state.data_summary is not None:
        summary["data"] = state.data_summary
    if recipe.eval.final and opts.data is None and dist.main and not ctx.layout.sharded:
        summary["heldout"] = final_score(model, recipe, ctx.root, ctx.bar)
    if run is not None and dist.main:
        from audiomoe.core.atomic import write_text

        write_text(run.path / "summary.json", json.dumps(summary, indent=2, default=str), what="run summary")
    return summary


__all__ = ["RunOptions", "TrainingInterrupted", "evaluate", "memory_check", "run_recipe"]
