"""Atomic checkpoints: ``step-000100/`` directories and the ``latest`` pointer. No pickle anywhere.

A checkpoint directory holds ``model.safetensors`` (weights), ``spec.yaml`` (the resolved spec:
``audiomoe.compose`` rebuilds the model from it), and the trainer state as ``trainer.json``
(step, optimizer hyper-parameters and structure, extra fields) + ``trainer.safetensors``
(optimizer moments, RNG states). Loading never calls ``torch.load``. A run with expert parallelism or
FSDP writes the same files: the one-process tensors its ranks gathered (``model_state`` /
``optimizer_state`` of :func:`save_checkpoint`), so every checkpoint loads in one process.

Write protocol (a ``kill -9`` at any instant leaves ``latest`` naming a complete checkpoint):

1. files are written and fsynced into ``.step-N.<pid>.<rand>/``;
2. a re-saved step moves the old directory aside (``.old-step-N.*``) *before* the new one is moved
   in, and removes it only after; a kill between the two renames is repaired on the next save
   (the aside copy is moved back), and :func:`resolve_checkpoint` reads the aside copy meanwhile;
3. ``latest`` is replaced atomically (temp file + ``os.replace``);
4. old checkpoints are pruned by step *number*, never the newest and never the one ``latest`` names.

Leftover temp directories of dead writers are removed by the next save. ``latest`` is trusted
only when it names a ``step-N`` directory directly inside the run directory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from audiomoe.core.atomic import current_umask
from audiomoe.core.composer import compose, resolve
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.limits import MAX_STEPS
from audiomoe.core.safe_yaml import load_yaml_file
from audiomoe.train.gradcheck import first_nonfinite
from audiomoe.train.meta_shards import ReadOnLookup, stored_tensors
from audiomoe.train.trainer_state import decode, encode, extra_problem, meta_problem

LATEST = "latest"
STEP_RE = re.compile(r"^step-(\d+)$")
# Temp names carry their writer's pid: `.step-N.<pid>.x`, `.old-step-N.<pid>.x` (a re-save's old
# copy), `.del-step-N.<pid>.x` (being pruned), `.latest.<pid>.x`, `.run.json.<pid>`, `.summary.json.<pid>`.
_ASIDE_RE = re.compile(r"^\.old-step-(\d+)\.")
_TEMP_RE = re.compile(r"^\.(?:(?:old-|del-)?step-\d+|latest|run\.json|summary\.json)\.(\d+)(?:\.|$)")
REQUIRED = ("model.safetensors", "spec.yaml")
FORMAT = 1


class CheckpointError(AudioMoEError):
    """A checkpoint could not be written or read; the message says which file and what is intact."""


def step_of(path: Path) -> Optional[int]:
    """The step number of a ``step-N`` directory name, else ``None``."""
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete ``step-N`` checkpoints in ``root`` as ``(step, path)``, by step *number*."""
    out = []
    for p in Path(root).glob("step-*"):
        n = step_of(p)
        if n is not None and p.is_dir() and not p.is_symlink() and all((p / f).is_file() for f in REQUIRED):
            out.append((n, p))
    return sorted(out)


def read_latest(root: str | os.PathLike) -> Optional[Path]:
    """The checkpoint ``root/latest`` names, or ``None`` when there is no pointer.

    Raises :class:`CheckpointError` when the pointer names anything but a complete ``step-N``
    directory directly inside ``root`` (``../other-run``, an absolute path, a symlink out).
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        raise CheckpointError(f"cannot read '{pointer}': {exc.strerror or exc}") from None
    if not STEP_RE.match(name):
        raise CheckpointError(
            f"'{pointer}' names {name[:80]!r}; it may only name a step-N directory of this run. "
            f"Fix or delete the file (checkpoints here: {', '.join(p.name for _, p in list_checkpoints(root)) or 'none'})"
        )
    target = root / name
    if not target.is_dir():
        aside = _aside_copies(root, name)
        if aside:  # killed between the two renames of a re-save: the old copy is still whole
            return aside[0]
        raise CheckpointError(f"'{pointer}' names {name}, which does not exist in '{root}'")
    if target.is_symlink() or target.resolve().parent != root.resolve():
        raise CheckpointError(f"'{target}' points outside the run directory '{root}'; refusing to follow it")
    missing = [f for f in REQUIRED if not (target / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint '{target}' is incomplete (missing {', '.join(missing)})")
    return target


def _aside_copies(root: Path, name: str) -> list[Path]:
    return [p for p in sorted(root.glob(f".old-{name}.*")) if all((p / f).is_file() for f in REQUIRED)]


def _pid_alive(pid: int) -> bool:
    """Whether a writer with ``pid`` may still be at work (run directories are local: pids are this host's)."""
    if pid == os.getpid():
        return False  # our own leftovers: no save of ours is in progress while we clean
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_run_dir(root: str | os.PathLike) -> None:
    """Repair an interrupted re-save and remove temp files of writers that are gone."""
    root = Path(root)
    for p in root.glob(".*"):
        m = _TEMP_RE.match(p.name)
        pid = int(m.group(1)) if m else None
        if pid is None or _pid_alive(pid):
            continue
        if p.name.startswith(".old-"):
            final = root / p.name[len(".old-") :].split(".")[0]
            if not final.exists() and p.is_dir():
                os.replace(p, final)  # the re-save died between its renames: keep the old copy
                continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    named = (root / LATEST).read_text(errors="replace").strip() if (root / LATEST).is_file() else None
    for p in root.glob("step-*"):  # incomplete step-N dirs only come from an rmtree cut short
        if STEP_RE.match(p.name) and p.is_dir() and p.name != named and not all((p / f).is_file() for f in REQUIRED):
            shutil.rmtree(p, ignore_errors=True)


# -- trainer state as safetensors + JSON (no pickle) --------------------------------------------


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    return decode(obj, tensors, "value")  # the codec lives with the trainer-state schema (trainer_state.py)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


_Tensors = dict[str, torch.Tensor]


def _contents(
    model: torch.nn.Module,
    step: int,
    optimizer: Any,
    extra: dict[str, Any],
    model_state: Optional[_Tensors],
    optimizer_state: Optional[dict[str, Any]],
) -> tuple[_Tensors, dict[str, Any], _Tensors]:
    """``(weights, trainer.json, trainer tensors)`` of a checkpoint, on the CPU."""
    source = model.state_dict() if model_state is None else model_state
    state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
    tensors: dict[str, torch.Tensor] = {}
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    try:
        meta = {
            "format": FORMAT,
            "step": step,
            "optimizer": encode(optimizer_state, "optimizer", tensors) if optimizer_state is not None else None,
            "rng": encode({"torch": torch.get_rng_state()}, "rng", tensors),
            "extra": encode(extra, "extra", tensors),
        }
    except TypeError as exc:
        raise CheckpointError(str(exc)) from None
    return state, meta, tensors


def _write_dir(tmp: Path, model: torch.nn.Module, state: _Tensors, meta: dict[str, Any], tensors: _Tensors) -> None:
    save_file(state, str(tmp / "model.safetensors"))
    _fsync_write(tmp / "spec.yaml", yaml.safe_dump(getattr(model, "spec", {}), sort_keys=False).encode("utf-8"))
    save_file(tensors, str(tmp / "trainer.safetensors"))
    _fsync_write(tmp / "trainer.json", json.dumps(meta).encode("utf-8"))
    for name in ("model.safetensors", "trainer.safetensors"):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    # mkdtemp makes 0700 directories: give the checkpoint the permissions of any file the user creates
    mask = current_umask()
    os.chmod(tmp, 0o777 & ~mask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~mask)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in ("No space left", "StorageFull", "file write failed", "Disk quota"))


def save_checkpoint(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    step: int,
    optimizer: Optional[torch.optim.Optimizer] = None,
    keep: int = 2,
    extra: Optional[dict[str, Any]] = None,
    *,
    model_state: Optional[dict[str, torch.Tensor]] = None,
    optimizer_state: Optional[dict[str, Any]] = None,
) -> Path:
    """Write ``out_dir/step-N`` atomically, point ``out_dir/latest`` at it, prune old ones; see the module doc.

    ``keep`` checkpoints are kept (``<= 0``: all). ``extra`` (JSON values and tensors) is stored
    with the trainer state and returned by :func:`load_trainer_state`. A failed write raises
    :class:`CheckpointError` saying which checkpoint is still intact. ``model_state`` /
    ``optimizer_state``: state dicts to write instead of ``model.state_dict()`` / ``optimizer.state_dict()``
    (a sharded run's gathered one-process dicts, :func:`audiomoe.train.fullstate.full_state_dict`).
    A state with a NaN / inf tensor is refused before anything is written: ``latest`` stays on the last good one.
    """
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEPS:
        raise CheckpointError(f"checkpoint step must be an integer in [0, {MAX_STEPS}], got {step!r}")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"checkpoint directory '{root}' is a file; give a directory")
    state, meta, tensors = _contents(model, step, optimizer, extra or {}, model_state, optimizer_state)
    moments = {k: v for k, v in tensors.items() if k.startswith("optimizer")}
    for what, part in (("model tensor", state), ("optimizer-state tensor", moments)):
        bad = first_nonfinite(part)
        if bad is not None:
            raise CheckpointError(
                f"refusing to write step {step} in '{root}': {what} '{bad}' holds NaN or inf; {_intact(root)}"
            )
    root.mkdir(parents=True, exist_ok=True)
    clean_run_dir(root)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", dir=root))
    try:
        _write_dir(tmp, model, state, meta, tensors)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt / SystemExit: the caller says what is intact
        intact = _intact(root)
        what = "disk full" if _is_disk_full(exc) else f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        raise CheckpointError(f"{what} while writing step {step} in '{root}'; {intact}") from None
    if final.exists():  # move the old copy aside first, then move the new one in, then remove
        aside = root / f".old-{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fd, ptmp = tempfile.mkstemp(prefix=f".latest.{os.getpid()}.", dir=root)
    os.chmod(ptmp, 0o666 & ~current_umask())
    with os.fdopen(fd, "w") as fh:
        fh.write(final.name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(ptmp, root / LATEST)
    _prune(root, keep, final)
    return final


def _intact(root: Path) -> str:
    try:
        good = read_latest(root)
    except CheckpointError:
        good = None
    return f"the previous checkpoint {good.name} is intact" if good else "no earlier checkpoint exists in this run"


def _prune(root: Path, keep: int, newest: Path) -> None:
    if keep <= 0:
        return
    ckpts = list_checkpoints(root)
    protect = {newest.name, ckpts[-1][1].name if ckpts else ""}
    for _, old in ckpts[:-keep]:
        if old.name not in protect:  # rename first: a kill mid-rmtree must not leave a half step-N
            doomed = root / f".del-{old.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


# -- loading ------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from ``path``: itself, or what a run directory's ``latest`` names (the run or the pointer)."""
    p = Path(path)
    if p.name == LATEST and p.is_file():  # the pointer file itself: what it names
        p = p.parent
    if (p / LATEST).exists():
        target = read_latest(p)
        assert target is not None
        return target
    if p.is_dir() and all((p / f).is_file() for f in REQUIRED):
        return p
    if p.is_dir() and STEP_RE.match(p.name) is None and list_checkpoints(p):
        raise CheckpointError(
            f"run directory '{p}' has checkpoints but no 'latest' pointer; load one of them: {list_checkpoints(p)[-1][1]}"
        )
    raise CheckpointError(f"'{p}' is not an audiomoe checkpoint (needs spec.yaml and model.safetensors)")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"'{path}' is damaged ({size:,} bytes; {' '.join(str(exc).split())[:120]}); "
            "load an earlier checkpoint of the run (step-N directories beside it)"
        ) from None


def load_checkpoint(path: str | os.PathLike, *, build_spec: Optional[Callable[[dict], dict]] = None) -> torch.nn.Module:
    """Rebuild a model from a checkpoint directory (or a run directory with a ``latest`` pointer).

    ``build_spec``: the spec to build instead, from the file's (the trainer sets its layout's
    ``expert_parallel``); ``model.spec`` stays the file's. The weights are one-process tensors either way.
    """
    p = resolve_checkpoint(path)
    spec = load_yaml_file(p / "spec.yaml", "checkpoint spec")
    if not isinstance(spec, dict):
        raise CheckpointError(f"'{p / 'spec.yaml'}' must hold a model spec mapping, not {type(spec).__name__}")
    state = _read_tensors(p / "model.safetensors")
    model = compose(spec if build_spec is None else build_spec(spec))
    if build_spec is not None:
        model.spec = resolve(spec).to_dict()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"'{p / 'model.safetensors'}' does not match '{p / 'spec.yaml'}': {first}") from None
    return model


def load_trainer_state(
    path: str | os.PathLike, optimizer: Optional[torch.optim.Optimizer] = None, *, lazy_optimizer: bool = False
) -> dict[str, Any]:
    """Read a checkpoint's trainer state; load it into ``optimizer``; return ``{step, rng, extra, path, optimizer}``.

    ``optimizer`` in the result is the saved one-process optimizer state (None when there is none), for a
    sharded run to load at its layout (:func:`audiomoe.train.fullstate.load_full_optimizer_state_dict`).
    ``lazy_optimizer``: its tensors stay in the file (``StoredTensor``: a sharded rank reads only its rows)."""
    p = resolve_checkpoint(path)
    meta_path = p / "trainer.json"
    if not meta_path.is_file() or not (p / "trainer.safetensors").is_file():
        raise CheckpointError(
            f"checkpoint '{p}' has no trainer state (trainer.json + trainer.safetensors); it cannot be resumed"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"'{meta_path}' is damaged: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"'{meta_path}' is not an audiomoe trainer state of format {FORMAT}")
    m = _ASIDE_RE.match(p.name)  # the aside copy of a re-save (read_latest may name it) keeps its step in its name
    problem = meta_problem(meta, step_of(p) if m is None else int(m.group(1)))
    if problem is None:
        file = p / "trainer.safetensors"
        tensors = stored_tensors(file, CheckpointError) if lazy_optimizer else _read_tensors(file)
        try:
            saved = decode(meta.get("optimizer"), tensors, "optimizer")  # lazy: StoredTensors, read at a layout
            rng, extra = (decode(meta.get(k), ReadOnLookup(tensors), k) for k in ("rng", "extra"))
            extra = {} if extra is None else extra
            problem = extra_problem(extra)
        except ValueError as exc:
            problem = str(exc)
        except RecursionError:
            problem = "its values are nested too deeply"
    if problem is not None:
        raise CheckpointError(
            f"'{meta_path}' is not a valid trainer state: {problem}; resume from another checkpoint "
            "of the run (--resume RUN/step-N) or start over with --overwrite"
        )
    if optimizer is not None and saved is not None:
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError, AttributeError) as exc:
            first = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"optimizer state in '{p}' does not fit this model: {first}") from None
    return {"step": meta["step"], "rng": rng, "extra": extra, "path": p, "optimizer": saved}
