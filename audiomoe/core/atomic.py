"""Files written whole or not at all: the one writer every text, JSON, CSV and HTML output goes through.

Each write goes to a temporary file in the destination's own folder (so the rename stays on one
file system), is flushed and fsynced, then renamed over the destination. A failure at any point
(a full disk, a file-size limit, Ctrl-C, an exception in the caller's block) removes the temporary
file and leaves the previous file untouched. :func:`check_output` refuses, before any work, an
output that is a directory, lies in a missing folder, or is one of the command's own inputs.
Checkpoints have their own writer (``train/checkpoint.py``): they are directories of tensors.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Optional

from audiomoe.core.errors import AudioMoEError

_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit or write elsewhere",
    errno.EACCES: "no permission to write there: pick another path",
    errno.EROFS: "the file system is read-only: pick another path",
}


class OutputError(AudioMoEError):
    """An output could not be written (or must not be); the previous file, if any, is unchanged."""

    def __init__(self, message: str, errno_: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno_


def _label(path: Path, what: str) -> str:
    return f"{what} '{path}'" if what else f"'{path}'"


def _target(path: Path, what: str) -> Path:
    """The file a write lands in: a symlink is written through (the link stays a link)."""
    if not os.path.islink(path):
        return path
    try:
        return Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:  # a dangling link: its target is created
        return Path(os.path.realpath(path))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(
                f"{_label(path, what)} is a symbolic link loop; remove the link or pick another path", exc.errno
            ) from None
        raise OutputError(f"cannot write {_label(path, what)}: {exc.strerror or exc}", exc.errno) from None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file (links and ``..`` resolved); False when either is absent."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        try:
            return os.path.realpath(a) == os.path.realpath(b)
        except (OSError, ValueError):
            return False


def check_output(
    path: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    what: str = "output",
    make_parent: bool = False,
) -> Path:
    """``path`` as a Path, or a named :class:`OutputError` if it cannot be written.

    Refused: a directory, a symlink loop, a folder that does not exist (created instead with
    ``make_parent``) or is a file, and any of ``inputs`` (writing over its own input destroys it).
    Called before the work, so a long run never ends in an unwritable output.
    """
    path = Path(path)
    label = _label(path, what)
    if str(path) in ("", "."):
        raise OutputError(f"{what}: an empty path; give a file name")
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # a loop in a parent folder's links
        raise OutputError(f"cannot write {label}: {exc.strerror or exc}", exc.errno) from None
    if is_dir:
        raise OutputError(f"{label} is a directory; give a file name (a path inside it)")
    target = _target(path, what)
    for src in inputs:
        if src is not None and same_file(target, src):
            raise OutputError(
                f"{label} is the same file as the input '{src}': writing it would destroy the input; "
                "give another output path"
            )
    parent = target.parent
    if make_parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the folder of {label}: {exc.strerror or exc}", exc.errno) from None
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist; create it first"
        raise OutputError(f"{label}: folder '{parent}' {why}")
    return path


def current_umask() -> int:
    """The process umask, read without setting it where the OS allows (setting it races with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(target: Path) -> int:
    """The mode the written file gets: the replaced file's, else what a plain ``open`` would create."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: some file systems refuse to open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike,
    mode: str = "w",
    *,
    what: str = "",
    encoding: Optional[str] = "utf-8",
    newline: Optional[str] = None,
) -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` when the block ends without an exception.

    ``mode`` is ``"w"`` (text) or ``"wb"``. On any failure the temporary file is removed, ``path``
    keeps its old content, and an ``OSError`` becomes an :class:`OutputError` naming ``path``.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    check_output(path, what=what)
    target = _target(path, what)
    tmp: Optional[str] = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.chmod(tmp, _file_mode(target))
        binary = "b" in mode
        text: dict[str, Any] = {} if binary else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **text) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(target.parent)
    except OSError as exc:
        hint = _HINTS.get(exc.errno or -1, "")
        raise OutputError(
            f"cannot write {_label(path, what)}: {exc.strerror or exc}"
            f"{'; ' + hint if hint else ''} (nothing was changed)",
            exc.errno,
        ) from exc
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, *, what: str = "") -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`); return ``path``."""
    with atomic_open(path, "wb", what=what) as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, what: str = "", encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`); return ``path``."""
    with atomic_open(path, "w", what=what, encoding=encoding) as fh:
        fh.write(text)
    return Path(path)


__all__ = ["OutputError", "atomic_open", "check_output", "same_file", "write_bytes", "write_text"]
