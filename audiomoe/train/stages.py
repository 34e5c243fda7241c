"""What happens at a stage boundary: the stage's init, its aux-weight schedule, and UniMoE's specialists stage.

- ``init.from_checkpoint``: the model's tensors from a checkpoint of the same architecture
  (``strict: false`` loads the tensors whose names and shapes match and reports the rest);
- ``init.from_specialists``: :func:`audiomoe.train.specialists.build_from_specialists` from dense
  checkpoints (run directories, checkpoint directories, or ``stage:NAME``: the members of an
  earlier specialists stage of this recipe, ``DIR/specialists/<member>``);
- ``aux_weight``: the UniMoE aux-loss weight of every router that has one is scheduled
  ``start -> end`` over the stage (its schedule position is reset to 0 when the stage starts and
  then moves once per optimizer step, as every schedule does);
- a ``specialists`` stage trains each member as a run of its own (a one-stage recipe: the main
  model made dense, :func:`~audiomoe.train.specialists.dense_overrides`, on the member's data) in
  ``DIR/specialists/<member>``; a finished member is skipped and an unfinished one resumed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..core.errors import AudioMoEError
from .checkpoint import CheckpointError, load_checkpoint, load_trainer_state, resolve_checkpoint
from .rundir import holds_run
from .recipe import AuxWeightSpec, InitSpec, Recipe, StageSpec
from .specialists import build_from_specialists, dense_overrides

SPECIALISTS_DIR = "specialists"


def aux_routers(model: torch.nn.Module) -> list[Any]:
    """Routers with a UniMoE aux-loss schedule (``set_aux_schedule`` and ``set_step``)."""
    return [m for m in model.modules() if callable(getattr(m, "set_aux_schedule", None)) and callable(getattr(m, "set_step", None))]


def apply_aux_weight(model: torch.nn.Module, spec: Optional[AuxWeightSpec], stage_steps: int, fresh: bool, where: str) -> int:
    """Schedule the UniMoE aux weight of every such router over the stage; return how many routers."""
    if spec is None:
        return 0
    routers = aux_routers(model)
    if not routers:
        raise AudioMoEError(f"{where}.aux_weight: this model has no router with a UniMoE aux loss (e.g. top_p); remove aux_weight")
    for r in routers:
        # the model's spec (spec.yaml) keeps the preset's values: a resumed stage applies this again
        r.set_aux_schedule(spec.start, spec.end, spec.steps or stage_steps, spec.kind)
        if fresh:
            r.set_step(0)
    return len(routers)


def member_dirs(recipe: Recipe, stage_name: str, root: Path) -> list[Path]:
    """Run directories of the members of specialists stage ``stage_name``."""
    st = next(s for s in recipe.stages if s.name == stage_name)
    assert st.specialists is not None
    return [root / SPECIALISTS_DIR / m.name for m in st.specialists.members]


def _tasks_seen(path: Path) -> Optional[list[str]]:
    try:
        extra = load_trainer_state(path)["extra"] or {}
    except CheckpointError:
        return None
    seen = extra.get("tasks_seen")
    return list(seen) if isinstance(seen, list) else None


def apply_init(model: torch.nn.Module, init: InitSpec, recipe: Recipe, root: Optional[Path], where: str) -> dict[str, Any]:
    """Run a stage's ``init`` on ``model`` (in place, on every rank alike); return a short report."""
    if init.from_checkpoint is not None:
        return _from_checkpoint(model, init, where)
    paths: list[Path] = []
    for ref in init.from_specialists or []:
        if ref.startswith("stage:"):
            if root is None:
                raise AudioMoEError(f"{where}.init: '{ref}' needs a run directory (--out) holding the specialists")
            paths += member_dirs(recipe, ref[len("stage:"):], root)
        else:
            paths.append(Path(ref))
    device = next(model.parameters()).device
    specialists, owners = [], []
    for p in paths:
        try:
            resolve_checkpoint(p)
        except CheckpointError as exc:
            raise AudioMoEError(f"{where}.init.from_specialists: {exc}") from None
        specialists.append(load_checkpoint(p).to(device))
        owners.append(_tasks_seen(p) or [])
    report = build_from_specialists(model, specialists, heads=init.heads, owners=owners)
    report["sources"] = [str(p) for p in paths]
    return report


def _from_checkpoint(model: torch.nn.Module, init: InitSpec, where: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = resolve_checkpoint(init.from_checkpoint)  # type: ignore[arg-type]
    saved = load_file(str(path / "model.safetensors"))
    own = model.state_dict()
    wrong = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if init.strict and (wrong or missing or unexpected):
        parts = [f"shapes differ: {', '.join(wrong[:3])}" if wrong else "", f"missing: {', '.join(missing[:5])}" if missing else "",
                 f"not in this model: {', '.join(unexpected[:5])}" if unexpected else ""]
        raise AudioMoEError(f"{where}.init.from_checkpoint '{path}' does not fit this model ({'; '.join(p for p in parts if p)}); "
                            "use a checkpoint of the same architecture, or strict: false to load the tensors that match")
    with torch.no_grad():
        n = 0
        for k, v in own.items():
            if k in saved and saved[k].shape == v.shape:
                v.copy_(saved[k].to(v.dtype))
                n += 1
    return {"from_checkpoint": str(path), "loaded": n, "missing": missing, "shape_mismatch": wrong}


def specialist_recipe(recipe: Recipe, stage: StageSpec, member: Any, spec: dict[str, Any]) -> Recipe:
    """The one-stage recipe of one member of a specialists stage."""
    assert stage.specialists is not None
    dense = stage.specialists.overrides
    if dense is None:
        dense = dense_overrides(spec, len(stage.specialists.members))
    raw = recipe.model_dump()
    raw["name"] = f"{recipe.name or 'recipe'}/{stage.name}/{member.name}"
    raw["model"] = {**raw["model"], "overrides": list(recipe.model.overrides) + list(dense)}
    # a dense specialist has no routed experts to spread: it trains data-parallel (FSDP as the recipe says)
    raw["distributed"] = {**raw["distributed"], "expert_parallel": None, "data_parallel": None}
    one = stage.model_dump()
    one.update(name=member.name, data=member.data.model_dump(), specialists=None, init=None)
    raw["stages"] = [one]
    return Recipe.model_validate(raw)


def run_specialists(recipe: Recipe, index: int, root: Optional[Path], spec: dict[str, Any], run_one: Callable[[Recipe, Path, bool], Any]) -> list[dict[str, Any]]:
    """Train (or resume, or skip when finished) every member of specialists stage ``index``."""
    st = recipe.stages[index]
    if root is None:
        raise AudioMoEError(f"stages.{index} ({st.name}) trains specialists into run directories: give --out DIR")
    assert st.specialists is not None
    out = []
    for m in st.specialists.members:
        d = root / SPECIALISTS_DIR / m.name
        summary = d / "summary.json"
        if summary.is_file():
            done = json.loads(summary.read_text(encoding="utf-8"))
            if done.get("steps") == st.steps:
                out.append({"member": m.name, "skipped": "finished", **{k: done.get(k) for k in ("final_loss", "eval_after")}})
                continue
        resume = d.is_dir() and holds_run(d)  # killed mid-member: continue it
        res = run_one(specialist_recipe(recipe, st, m, spec), d, resume)
        out.append({"member": m.name, **{k: res.get(k) for k in ("final_loss", "eval_after", "seconds")}})
    return out
