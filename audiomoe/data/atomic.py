"""Directories made once, atomically: built in a temporary sibling, then renamed into place.

A crash leaves no half-made directory (the next call builds again), and two processes racing to
make the same one both end with the winner's copy (the loser's is removed). Used by the built-in
corpus and its codec codes, both cached for every later run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def build_once(final: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """``final``, built by ``build(tmp_dir)`` unless ``final / marker`` already exists."""
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not (final / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
