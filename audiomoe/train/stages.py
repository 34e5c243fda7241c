"""What happens at a stage boundary: the stage's init, its aux-weight schedule, and UniMoE's specialists stage.

- ``init.from_checkpoint``: the model's tensors from a checkpoint of the same architecture
  (``strict: false`` loads the tensors whose names and shapes match and reports the rest), or
  ``stage:NAME``, an earlier foundation stage (``DIR/foundation/NAME``);
- ``init.upcycle``: the MoE from one dense checkpoint of the specialists' architecture (a
  foundation): every routed expert a slice of its FFN (cyclically, as many copies as the MoE
  needs), every other tensor copied; gates and shared experts fresh, exactly as the merge of
  specialists that all equal it (so a curriculum and its naive baseline start alike);
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
from typing import Any, Callable, Optional, Sequence

import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.train import foundation_cache
from audiomoe.train.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_trainer_state,
    resolve_checkpoint,
)
from audiomoe.train.recipe import AuxWeightSpec, InitSpec, Recipe, StageSpec
from audiomoe.train.rundir import holds_run
from audiomoe.train.specialists import build_from_specialists, dense_overrides, moe_layers

SPECIALISTS_DIR = "specialists"
FOUNDATION_DIR = "foundation"


def aux_routers(model: torch.nn.Module) -> list[Any]:
    """Routers with a UniMoE aux-loss schedule (``set_aux_schedule`` and ``set_step``)."""
    return [
        m
        for m in model.modules()
        if callable(getattr(m, "set_aux_schedule", None)) and callable(getattr(m, "set_step", None))
    ]


def apply_aux_weight(
    model: torch.nn.Module, spec: Optional[AuxWeightSpec], stage_steps: int, fresh: bool, where: str
) -> int:
    """Schedule the UniMoE aux weight of every such router over the stage; return how many routers."""
    if spec is None:
        return 0
    routers = aux_routers(model)
    if not routers:
        raise AudioMoEError(
            f"{where}.aux_weight: this model has no router with a UniMoE aux loss (e.g. top_p); remove aux_weight"
        )
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
    return [root / SPECIALISTS_DIR / m.name for m in st.specialists.members or []]


def foundation_dir(root: Path, stage_name: str) -> Path:
    """Run directory of foundation stage ``stage_name``."""
    return root / FOUNDATION_DIR / stage_name


def _stage_path(ref: str, root: Optional[Path], where: str) -> Path:
    """A checkpoint reference: a path, or ``stage:NAME`` for an earlier foundation stage of this run."""
    if not ref.startswith("stage:"):
        return Path(ref)
    if root is None:
        raise AudioMoEError(f"{where}.init: '{ref}' needs a run directory (--out) holding the foundation")
    return foundation_dir(root, ref[len("stage:") :])


def _tasks_seen(path: Path) -> Optional[list[str]]:
    try:
        extra = load_trainer_state(path)["extra"] or {}
    except CheckpointError:
        return None
    seen = extra.get("tasks_seen")
    return list(seen) if isinstance(seen, list) else None


def apply_init(
    model: torch.nn.Module, init: InitSpec, recipe: Recipe, root: Optional[Path], where: str
) -> dict[str, Any]:
    """Run a stage's ``init`` on ``model`` (in place, on every rank alike); return a short report."""
    if init.from_checkpoint is not None:
        return _from_checkpoint(model, init, _stage_path(init.from_checkpoint, root, where), where)
    if init.upcycle is not None:
        return _upcycle(model, _stage_path(init.upcycle, root, where), where)
    paths: list[Path] = []
    for ref in init.from_specialists or []:
        if ref.startswith("stage:"):
            if root is None:
                raise AudioMoEError(f"{where}.init: '{ref}' needs a run directory (--out) holding the specialists")
            paths += member_dirs(recipe, ref[len("stage:") :], root)
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


def _upcycle(model: torch.nn.Module, path: Path, where: str) -> dict[str, Any]:
    """The MoE from one dense checkpoint: the merge of as many copies of it as the routed experts need."""
    try:
        resolve_checkpoint(path)
    except CheckpointError as exc:
        raise AudioMoEError(f"{where}.init.upcycle: {exc}") from None
    dense = load_checkpoint(path).to(next(model.parameters()).device)
    layer = next(iter(moe_layers(model).items()), None)
    if layer is None:
        raise AudioMoEError(f"{where}.init.upcycle builds MoE layers, but this model has none")
    name, moe = layer
    width = dict(dense.state_dict()).get(f"{name}.experts.down_proj")
    total = moe.experts.num_experts * moe.experts.d_ff
    if width is None or total % width.shape[-1]:
        got = "no dense FFN there" if width is None else f"FFN width {width.shape[-1]}"
        raise AudioMoEError(
            f"{where}.init.upcycle: '{path}' has {got} at '{name}'; the MoE's "
            f"{moe.experts.num_experts} x {moe.experts.d_ff} routed width must be a multiple of it: "
            "train it with the dense overrides (specialists.py: dense_overrides)"
        )
    copies = total // width.shape[-1]
    report = build_from_specialists(model, [dense] * copies, heads="average")
    return {**report, "upcycled": str(path), "copies": copies}


def _from_checkpoint(model: torch.nn.Module, init: InitSpec, path: Path, where: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = resolve_checkpoint(path)
    saved = load_file(str(path / "model.safetensors"))
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in saved and saved[k].shape != v.shape
    ]
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if init.strict and (wrong or missing or unexpected):
        parts = [
            f"shapes differ: {', '.join(wrong[:3])}" if wrong else "",
            f"missing: {', '.join(missing[:5])}" if missing else "",
            f"not in this model: {', '.join(unexpected[:5])}" if unexpected else "",
        ]
        raise AudioMoEError(
            f"{where}.init.from_checkpoint '{path}' does not fit this model ({'; '.join(p for p in parts if p)}); "
            "use a checkpoint of the same architecture, or strict: false to load the tensors that match"
        )
    with torch.no_grad():
        n = 0
        for k, v in own.items():
            if k in saved and saved[k].shape == v.shape:
                v.copy_(saved[k].to(v.dtype))
                n += 1
    return {"from_checkpoint": str(path), "loaded": n, "missing": missing, "shape_mismatch": wrong}


def specialist_recipe(
    recipe: Recipe, stage: StageSpec, member: Any, spec: dict[str, Any], root: Optional[Path] = None
) -> Recipe:
    """The one-stage recipe of one member of a specialists stage."""
    assert stage.specialists is not None
    dense = stage.specialists.overrides
    if dense is None:
        dense = dense_overrides(spec, len(stage.specialists.members or []))
    raw = recipe.model_dump()
    raw["name"] = f"{recipe.name or 'recipe'}/{stage.name}/{member.name}"
    raw["model"] = {**raw["model"], "overrides": list(recipe.model.overrides) + list(dense)}
    # a dense specialist has no routed experts to spread: it trains data-parallel (FSDP as the recipe says)
    raw["distributed"] = {**raw["distributed"], "expert_parallel": None, "data_parallel": None}
    one = stage.model_dump()
    init = None
    if stage.init is not None:  # every member starts from the same dense checkpoint (a foundation)
        start = _stage_path(stage.init.from_checkpoint or "", root, f"stages.{stage.name}")
        init = {**stage.init.model_dump(), "from_checkpoint": str(start)}
    one.update(name=member.name, data=member.data.model_dump(), specialists=None, init=init)
    if stage.specialists.overrides is None:
        one["freeze"] = _with_dense_gates(one["freeze"])
    raw["stages"] = [one]
    return Recipe.model_validate(raw)


def _with_dense_gates(freeze: list[str]) -> list[str]:
    """``freeze`` plus the dense model's one-column MoE routers: a softmax over one column is exactly 1, so they
    get no gradient (the gradient check would warn every run) and the MoE built from the model gets fresh gates."""
    return freeze if _DENSE_GATES in freeze else [*freeze, _DENSE_GATES]


_DENSE_GATES = "backbone.*.router"


def foundation_width(recipe: Recipe, index: int) -> int:
    """How many specialists the foundation of stage ``index`` is as wide as (its FFN = that many specialists' slices).

    The specialists stage that starts from it decides (their widths must match); without one, one
    specialist per domain (a naive baseline's foundation is then the curriculum's); else 1 (the whole MoE width).
    """
    name = recipe.stages[index].name
    for st in recipe.stages[index + 1 :]:
        if st.specialists is not None and st.init is not None and st.init.from_checkpoint == f"stage:{name}":
            return len(st.specialists.members or [])
    return len(recipe.domains) if recipe.domains else 1


def foundation_recipe(recipe: Recipe, index: int, spec: dict[str, Any]) -> Recipe:
    """The one-stage recipe of foundation stage ``index``: the dense model on the stage's data."""
    stage = recipe.stages[index]
    assert stage.foundation is not None
    dense = stage.foundation.overrides
    if dense is None:
        dense = dense_overrides(spec, foundation_width(recipe, index))
    raw = recipe.model_dump()
    raw["name"] = f"{recipe.name or 'recipe'}/{stage.name}"
    raw["model"] = {**raw["model"], "overrides": list(recipe.model.overrides) + list(dense)}
    raw["distributed"] = {**raw["distributed"], "expert_parallel": None, "data_parallel": None}
    one = stage.model_dump()
    one.update(foundation=None)
    if stage.foundation.overrides is None:
        one["freeze"] = _with_dense_gates(one["freeze"])
    raw["stages"] = [one]
    return Recipe.model_validate(raw)


def _trained_unscored(d: Path, steps: int) -> bool:
    """A side run killed after its last step's checkpoint, before its final score and summary: it is trained
    (resuming it would find nothing left to train and refuse)."""
    return (
        d.is_dir()
        and not (d / "summary.json").is_file()
        and max((s for s, _ in list_checkpoints(d)), default=0) >= steps
    )


def run_specialists(
    recipe: Recipe, index: int, root: Optional[Path], spec: dict[str, Any], run_one: Callable[[Recipe, Path, bool], Any]
) -> list[dict[str, Any]]:
    """Train (or resume, or skip when finished) every member of specialists stage ``index``."""
    st = recipe.stages[index]
    if root is None:
        raise AudioMoEError(f"stages.{index} ({st.name}) trains specialists into run directories: give --out DIR")
    assert st.specialists is not None
    out = []
    for m in st.specialists.members or []:
        d = root / SPECIALISTS_DIR / m.name
        summary = d / "summary.json"
        if summary.is_file():
            done = json.loads(summary.read_text(encoding="utf-8"))
            if done.get("steps") == st.steps:
                out.append(
                    {"member": m.name, "skipped": "finished", **{k: done.get(k) for k in ("final_loss", "eval_after")}}
                )
                continue
        if _trained_unscored(d, st.steps):
            out.append({"member": m.name, "skipped": "finished (stopped before its final score)"})
            continue
        resume = d.is_dir() and holds_run(d)  # killed mid-member: continue it
        res = run_one(specialist_recipe(recipe, st, m, spec, root), d, resume)
        out.append({"member": m.name, **{k: res.get(k) for k in ("final_loss", "eval_after", "seconds")}})
    return out


def run_foundation(
    recipe: Recipe,
    index: int,
    root: Optional[Path],
    spec: dict[str, Any],
    run_one: Callable[[Recipe, Path, bool], Any],
    device: Optional[str] = None,
) -> dict[str, Any]:
    """Train (or resume, or skip when finished, or copy from the cache) the dense model of foundation stage ``index``.

    ``device``: where it trains, single-process; ``None`` never reuses a stored foundation (foundation_cache.py).
    """
    st = recipe.stages[index]
    if root is None:
        raise AudioMoEError(f"stages.{index} ({st.name}) trains a foundation into a run directory: give --out DIR")
    d = foundation_dir(root, st.name)
    summary = d / "summary.json"
    if summary.is_file():
        done = json.loads(summary.read_text(encoding="utf-8"))
        if done.get("steps") == st.steps:
            return {"skipped": "finished", **{k: done.get(k) for k in ("final_loss", "eval_after")}}
    if _trained_unscored(d, st.steps):
        return {"skipped": "finished (stopped before its final score)"}
    sub = foundation_recipe(recipe, index, spec)
    assert st.foundation is not None
    key = foundation_cache.reuse_key(sub, spec, device) if st.foundation.reuse and device is not None else None
    done = foundation_cache.restore(key, d) if key else None
    if done is not None:
        return {"dir": str(d), "reused": done["reused"], **{k: done.get(k) for k in ("final_loss", "eval_after")}}
    res = run_one(sub, d, d.is_dir() and holds_run(d))
    if key:
        foundation_cache.store(key, d)
    return {"dir": str(d), **{k: res.get(k) for k in ("final_loss", "eval_after", "seconds")}}


def check_domains(recipe: Recipe, tasks: Sequence[str]) -> None:
    """Every task of the model is in one of the recipe's domains (else its share of the mix is undefined)."""
    if not recipe.domains:
        return
    known = {t for d in recipe.domains.values() for t in d.tasks}
    loose = [t for t in tasks if t not in known]
    if loose:
        raise AudioMoEError(
            f"the model's task(s) {', '.join(loose)} are in none of the recipe's domains "
            f"({', '.join(recipe.domains)}): add them to a domain's tasks, or drop their heads"
        )
