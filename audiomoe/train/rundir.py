"""Run directories: one training run per ``--out`` directory, locked while it trains.

:func:`open_run_dir` is called before any training time is spent. It

- creates the directory (or says why it cannot: a file in its place, a missing permission);
- takes an exclusive lock (``.lock``, ``fcntl.flock``; the kernel drops it when the process dies,
  even on ``kill -9``), so two runs never write one directory at once;
- refuses a directory that already holds a run (``run.json``, ``latest`` or ``step-N``) unless the
  caller resumes it or overwrites it; overwriting removes only audiomoe's own files;
- records the run's identity, spec and options in ``run.json`` once the run really starts
  (:meth:`RunDir.start`), so a run refused by a later check leaves nothing behind.
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

from .checkpoint import LATEST, CheckpointError, clean_run_dir, list_checkpoints, read_latest

try:  # POSIX; elsewhere runs are not locked (documented in the README)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
#: what training, ``audiomoe eval`` (eval-SPLIT.json) and ``audiomoe report`` (measure, report, plots) leave in a run
OWN_FILES = (RUN_FILE, LATEST, "summary.json", "log.jsonl", "measure.json", "report.md", "report.html")
OWN_DIRS = ("tb", "specialists", "plots")  # TensorBoard events; a UniMoE curriculum's dense specialists; report plots


class RunDirError(CheckpointError):
    """The run directory cannot be used as asked (another run in it, in use, not a directory)."""


@dataclass
class RunDir:
    """An open, locked run directory. ``info`` is ``run.json``; ``resume_from`` the checkpoint to continue."""

    path: Path
    info: dict[str, Any]
    resume_from: Optional[Path] = None
    overwrite: bool = False
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
        tmp = self.path / f".{RUN_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(self.info, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, self.path / RUN_FILE)


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
    for p in list(path.glob("step-*")) + list(path.glob(".step-*")) + list(path.glob(".old-step-*")) + list(path.glob(".del-step-*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _describe(path: Path) -> str:
    ckpts = list_checkpoints(path)
    return f"checkpoints up to step {ckpts[-1][0]}" if ckpts else "no checkpoint yet"


def open_run_dir(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, info: Optional[dict[str, Any]] = None) -> RunDir:
    """Create / check / lock ``out`` for a run; see the module doc. Raises :class:`RunDirError`."""
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
        run = _prepare(path, resume, overwrite, info or {})
    except BaseException:
        lock.close()
        raise
    run._lock = lock
    return run


def _prepare(path: Path, resume: bool, overwrite: bool, info: dict[str, Any]) -> RunDir:
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
        return RunDir(path, {**old, "resumed": old.get("resumed", 0) + 1}, read_latest(path))
    if holds_run(path) and not overwrite:
        raise RunDirError(
            f"'{path}' already holds a training run ({_describe(path)}); continue it with --resume, "
            "start over with --overwrite (deletes its checkpoints), or give another --out"
        )
    info = {"run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    return RunDir(path, info, overwrite=holds_run(path))
