"""Run directories: one training run per ``--out`` directory, locked while it trains.

:func:`open_run_dir` is called before any training time is spent. It

- creates the directory (or says why it cannot: a file in its place, a missing permission);
- takes an exclusive lock (``.lock``, ``fcntl.flock``; the kernel drops it when the process dies,
  even on ``kill -9``), so two runs never write one directory at once;
- refuses a directory that already holds a run (``run.json``, ``latest`` or ``step-N``) unless the
  caller resumes it or overwrites it; overwriting removes only audiomoe's own files;
- records the run's identity, spec and options in ``run.json`` once the run really starts
  (:meth:`RunDir.start`), so a run refused by a later check leaves nothing behind.

A resumed run continues from the checkpoint ``latest`` names; when that one is missing or cannot be
resumed (damaged files, NaN weights, a bad trainer state) from the newest intact checkpoint, saying
so (:func:`resume_point`); ``--resume DIR/step-N`` continues from that one (:func:`resume_target`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.safe_yaml import load_yaml_file
from audiomoe.train.checkpoint import (
    LATEST,
    REQUIRED,
    STEP_RE,
    CheckpointError,
    clean_run_dir,
    list_checkpoints,
    load_trainer_state,
    read_latest,
)
from audiomoe.train.gradcheck import first_nonfinite
from audiomoe.train.meta_shards import stored_tensors

try:  # POSIX; elsewhere runs are not locked (documented in the README)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # no fcntl off POSIX: locking is skipped

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
#: what training, ``audiomoe eval`` (eval-SPLIT.json) and ``audiomoe report`` (measure, report, plots) leave in a run
OWN_FILES = (RUN_FILE, LATEST, "summary.json", "log.jsonl", "measure.json", "report.md", "report.html")
OWN_DIRS = ("tb", "specialists", "foundation", "plots")  # TensorBoard; a UniMoE curriculum's dense runs; plots


class RunDirError(CheckpointError):
    """The run directory cannot be used as asked (another run in it, in use, not a directory)."""


@dataclass
class RunDir:
    """An open, locked run directory. ``info`` is ``run.json``; ``resume_from`` the checkpoint to continue."""

    path: Path
    info: dict[str, Any]
    resume_from: Optional[Path] = None
    overwrite: bool = False
    note: Optional[str] = None  # why the run resumes from another checkpoint than the one `latest` names
    _lock: Any = field(default=None, repr=False)

    def start(self, **info: Any) -> None:
        """The run really starts (model built, data checked): clear an overwritten run, write ``run.json``.

        Until this is called the directory is only locked: a run that fails its checks leaves
        no trace that a later run would have to ``--overwrite``.
        """
        if self.overwrite:
            _remove_own_files(self.path)
            self.overwrite = False
        for k, v in info.items():
            self.info.setdefault(k, v)
        self.write_info()

    def close(self) -> None:
        """Release the lock (also released by the OS when the process exits)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def write_info(self) -> None:
        """Write ``run.json`` atomically."""
        from audiomoe.core.atomic import write_text

        write_text(self.path / RUN_FILE, json.dumps(self.info, indent=2, default=str), what="run record")


def recorded_data(checkpoint: str | os.PathLike) -> Any:
    """The data a checkpoint's run trained on (a manifest / data file path or a data spec), or None.

    None when the checkpoint is not inside a run directory, or the run used ``auto``, ``builtin`` or ``tones``.
    """
    try:
        info = json.loads((Path(checkpoint).parent / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    data = (info.get("recipe") or {}).get("data")
    return None if data in (None, "auto", "builtin", "tones") else data


def holds_run(path: Path) -> bool:
    """Whether ``path`` already holds an audiomoe run."""
    return (path / RUN_FILE).exists() or (path / LATEST).exists() or any(path.glob("step-*"))


def _lock(path: Path) -> Any:
    fh = open(path / LOCK_FILE, "a+", encoding="utf-8")
    if fcntl is None:  # pragma: no cover
        return fh
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        who = fh.read().strip() or "another process"
        fh.close()
        raise RunDirError(
            f"'{path}' is in use by another `audiomoe train` ({who}); wait for it to finish or give another --out"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    return fh


def _remove_own_files(path: Path) -> None:
    for name in OWN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in OWN_DIRS:
        if (path / name).is_dir() and not (path / name).is_symlink():
            shutil.rmtree(path / name)
    for p in path.glob("eval-*.json"):
        p.unlink(missing_ok=True)
    for p in (
        list(path.glob("step-*"))
        + list(path.glob(".step-*"))
        + list(path.glob(".old-step-*"))
        + list(path.glob(".del-step-*"))
    ):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _describe(path: Path) -> str:
    ckpts = list_checkpoints(path)
    return f"checkpoints up to step {ckpts[-1][0]}" if ckpts else "no checkpoint yet"


def resume_target(path: str | os.PathLike) -> tuple[Path, Optional[Path]]:
    """The run directory and the checkpoint ``--resume PATH`` names (None: the run's own choice, :func:`resume_point`).

    ``PATH`` is a run directory, its ``latest`` file, or one of its ``step-N`` checkpoint directories.
    """
    p = Path(path)
    if p.name == LATEST and p.is_file():
        return p.parent, None
    if STEP_RE.match(p.name) and not (p.is_dir() and holds_run(p)) and p.parent.is_dir() and holds_run(p.parent):
        return p.parent, p
    return p, None


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a run cannot resume from checkpoint ``path``, else None.

    Missing or damaged files, NaN / inf weights (an older version could write them), a bad trainer state.
    """
    if not path.is_dir():
        return "it does not exist"
    if path.is_symlink() or path.resolve().parent != path.parent.resolve():
        return "it points outside its run directory"
    missing = [f for f in (*REQUIRED, "trainer.json", "trainer.safetensors") if not (path / f).is_file()]
    if missing:
        return f"it is incomplete (missing {', '.join(missing)})"
    try:
        if not isinstance(load_yaml_file(path / "spec.yaml", "checkpoint spec"), dict):
            return "its spec.yaml holds no model spec mapping"
        load_trainer_state(path, lazy_optimizer=True)  # every rank checks: the moments stay in the file
    except AudioMoEError as exc:
        return str(exc)
    # a block at a time, with plain reads: a memory map's touched pages would stay resident (the whole
    # model, in every rank's peak memory, before a sharded resume reads only its rows)
    try:
        for key, stored in stored_tensors(path / "model.safetensors").items():
            if any(first_nonfinite({key: block}) for block in stored.blocks()):
                return f"its weight '{key}' holds NaN or inf"
    except AudioMoEError as exc:
        return f"its model.safetensors is damaged ({' '.join(str(exc).split())[:120]})"
    return None


def resume_point(root: Path, at: Optional[Path] = None) -> tuple[Optional[Path], Optional[str]]:
    """``(checkpoint, note)``: where a resumed run in ``root`` continues, and why it is not the one ``latest`` names.

    ``at`` (a step directory the user named) must be intact. Otherwise ``latest``'s checkpoint, or
    when it is missing or cannot be resumed, the newest intact one. ``(None, None)``: no checkpoint
    was ever written (the run starts over). Raises :class:`RunDirError` when nothing intact is left.
    """
    if at is not None:
        problem = checkpoint_problem(at)
        if problem is not None:
            raise RunDirError(f"cannot resume from '{at}': {problem}; {_choices(root)}")
        return at, None
    try:
        named = read_latest(root)
        why = None if named is not None else f"'{root / LATEST}' is missing"
    except CheckpointError as exc:
        named, why = None, str(exc)
    if named is not None:
        problem = checkpoint_problem(named)
        if problem is None:
            return named, None
        why = f"the checkpoint 'latest' names ({named.name}) cannot be resumed: {problem}"
    others = [p for _, p in reversed(list_checkpoints(root)) if p != named]
    if named is None and not others and not (root / LATEST).exists():
        return None, None  # killed before its first checkpoint: it starts over
    tried = []
    for p in others:
        problem = checkpoint_problem(p)
        if problem is None:
            return p, f"{why}; resuming from {p.name}, the newest intact checkpoint"
        tried.append(f"; {p.name}: {problem}")
    raise RunDirError(f"nothing intact to resume in '{root}': {why}{''.join(tried[:3])}; start over with --overwrite")


def _choices(root: Path) -> str:
    ckpts = list_checkpoints(root)
    if not ckpts:
        return "this run has no other checkpoint"
    return f"checkpoints of this run: {', '.join(p.name for _, p in ckpts)}"


def open_run_dir(
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    info: Optional[dict[str, Any]] = None,
    at: Optional[Path] = None,
) -> RunDir:
    """Create / check / lock ``out`` for a run; see the module doc. Raises :class:`RunDirError`.

    ``at``: the checkpoint to resume from (``--resume RUN/step-N``, :func:`resume_target`);
    None: the one :func:`resume_point` picks.
    """
    if resume and overwrite:
        raise RunDirError("--resume continues a run and --overwrite deletes it; give one of them")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out '{path}' is a file, not a directory; give a directory for checkpoints")
    if resume and not path.is_dir():
        raise RunDirError(f"nothing to resume in '{path}': no such directory; start a run there without --resume")
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
    except RunDirError:
        raise
    except OSError as exc:
        raise RunDirError(f"cannot use --out '{path}': {exc.strerror or exc}") from None
    try:
        run = _prepare(path, resume, overwrite, info or {}, at)
    except BaseException:
        lock.close()
        raise
    run._lock = lock
    return run


def _prepare(path: Path, resume: bool, overwrite: bool, info: dict[str, Any], at: Optional[Path]) -> RunDir:
    clean_run_dir(path)
    if resume:
        if not holds_run(path):
            raise RunDirError(f"nothing to resume in '{path}': it holds no audiomoe run; start one without --resume")
        old: dict[str, Any] = {}
        if (path / RUN_FILE).is_file():
            try:
                old = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
            except ValueError:
                raise RunDirError(f"'{path / RUN_FILE}' is damaged; start over with --overwrite") from None
        ckpt, note = resume_point(path, at)
        return RunDir(path, {**old, "resumed": old.get("resumed", 0) + 1}, ckpt, note=note)
    if holds_run(path) and not overwrite:
        raise RunDirError(
            f"'{path}' already holds a training run ({_describe(path)}); continue it with --resume, "
            "start over with --overwrite (deletes its checkpoints), or give another --out"
        )
    info = {"run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    return RunDir(path, info, overwrite=holds_run(path))
