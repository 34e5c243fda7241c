"""A foundation stage's ``reuse``: one trained dense foundation shared by the runs that would train it alike.

UniMoE-Audio's curriculum (arXiv 2510.13344) starts from one dense foundation; a study's curriculum
and its naive baselines at one seed train that same foundation (same one-stage recipe, same data,
same seed: bit-identical, see ``tests/train/test_train_foundation.py``). With ``reuse`` (the
default) a finished foundation run directory is stored in ``$AUDIOMOE_CACHE/foundations/<digest>``
and copied into the next run that asks for the same. The digest covers everything the foundation's
weights depend on: its one-stage recipe (all but its name), the model spec, the corpus version, the
source of this package (any code change trains anew), the torch version and the device. Only
deterministic data qualifies (``auto``, ``builtin``, ``tones``): a manifest's files may change
under an unchanged path, so a manifest-fed foundation always trains. Single-process runs only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from audiomoe.data.atomic import build_once
from audiomoe.train.rundir import LOCK_FILE

_DETERMINISTIC_DATA = ("auto", "builtin", "tones")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """Digest of this package's Python and YAML files: a result cached by other code is another result."""
    import audiomoe

    root = Path(audiomoe.__file__).parent
    h = hashlib.blake2b(digest_size=16)
    for p in sorted(q for q in root.rglob("*") if q.suffix in (".py", ".yaml") and "__pycache__" not in q.parts):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def reuse_key(sub: Any, spec: dict[str, Any], device: str) -> Optional[str]:
    """The digest of foundation recipe ``sub`` (a one-stage :class:`Recipe`) on ``device``; ``None``: never reuse."""
    import torch

    from audiomoe.data.corpus.make import VERSION

    if not isinstance(sub.data, str) or sub.data not in _DETERMINISTIC_DATA:
        return None
    raw = sub.model_dump(mode="json", exclude={"name", "summary"})
    raw["stages"] = [{k: v for k, v in st.items() if k != "name"} for st in raw["stages"]]
    what = {"recipe": raw, "spec": spec, "corpus": VERSION, "code": source_digest()}
    what.update(torch=torch.__version__, device=device)
    return hashlib.blake2b(json.dumps(what, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()


def cache_dir() -> Path:
    """Where foundations are kept: ``$AUDIOMOE_CACHE/foundations``."""
    from audiomoe.data.corpus.make import default_cache_dir

    return default_cache_dir() / "foundations"


def restore(key: str, d: Path) -> Optional[dict[str, Any]]:
    """Copy the stored foundation ``key`` into the (absent) run directory ``d``; its summary, or ``None`` if none."""
    src = cache_dir() / key
    if not (src / "summary.json").is_file() or d.exists():
        return None

    def copy(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        summary = json.loads((tmp / "summary.json").read_text(encoding="utf-8"))
        if summary.get("checkpoint"):  # the stored run's absolute path: point it at this copy
            summary["checkpoint"] = str(d / Path(summary["checkpoint"]).name)
        summary["reused"] = str(src)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")

    try:  # built beside it, then renamed: a crash leaves no half foundation that would look finished
        build_once(d, "summary.json", copy)
        return json.loads((d / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # damaged or vanished entry: train


def store(key: str, d: Path) -> None:
    """Keep the finished foundation run ``d`` under ``key`` (atomically; a concurrent store of the same wins)."""
    if not (d / "summary.json").is_file():
        return
    try:
        build_once(
            cache_dir() / key,
            "summary.json",
            lambda tmp: shutil.copytree(d, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(LOCK_FILE)),
        )
    except OSError:  # the disk is full, say: training already succeeded, only the copy is lost
        pass
