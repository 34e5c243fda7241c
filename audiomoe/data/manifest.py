"""JSONL manifests: one audio item per line, validated with the file and line of every problem.

The format follows SpeechBrain's JSON manifests and lhotse's cuts, reduced to what a multi-task
audio model needs::

    {"audio": "wav/utt1.wav", "task": "asr", "target": "turn the light on", "split": "train"}
    {"audio": "wav/long.flac", "offset": 2.5, "duration": 1.0, "task": "event", "target": "siren",
     "dataset": "mycorpus", "meta": {"snr": 10}}

``audio`` is a path relative to the manifest (wav/flac/ogg, read with soundfile); ``offset`` and
``duration`` (seconds) select a segment; ``target`` is a class label, a transcript, an answer or
``{"codes": "codes/x.npy"}`` (codec codes [num_codebooks, frames], loaded in the workers) or
``{"audio": "wav/y.wav"}`` (a clip to write: :func:`audiomoe.data.codes.encode_manifest` turns it
into codes); ``prompt`` an optional text input; ``dataset``/``split`` free strings (no ``split``: ``train``) and
``meta`` free metadata. Any other key is an error (a typo must not silently drop a field).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from audiomoe.core.atomic import atomic_open
from audiomoe.core.errors import AudioMoEError, did_you_mean, short_repr

FIELDS = ("audio", "offset", "duration", "task", "target", "prompt", "dataset", "split", "meta")


@dataclass
class Item:
    """One audio item: where its samples are, what task it serves, and where it was declared.

    ``audio`` is an absolute path, or ``None`` when ``blob`` holds the encoded file (HF datasets).
    ``origin`` is ``"file:line"`` (or ``"dataset[row]"``): every error about the item names it.
    ``duration`` is the segment length in seconds (read from the file header when not given).
    """

    audio: Optional[str]
    task: str
    target: Any = None
    offset: float = 0.0
    duration: float = 0.0
    prompt: Any = None
    dataset: str = ""
    split: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    blob: Optional[bytes] = None

    def to_json(self, root: Path) -> dict[str, Any]:
        """The manifest line of this item, with ``audio`` relative to ``root``."""
        out = {k: v for k, v in asdict(self).items() if k in FIELDS}
        out["audio"] = os.path.relpath(self.audio, root) if self.audio else None
        if isinstance(self.target, dict):
            out["target"] = {
                k: os.path.relpath(v, root)
                if k in ("codes", "audio") and isinstance(v, str) and os.path.isabs(v)
                else v
                for k, v in self.target.items()
            }
        if not out["offset"]:
            del out["offset"]
        return {k: v for k, v in out.items() if v not in (None, "", {})}


def audio_info(path: str, origin: str) -> float:
    """Duration in seconds from the file header; a missing or unreadable file is a named error."""
    import soundfile as sf

    if not os.path.exists(path):
        raise AudioMoEError(f"{origin}: audio file '{path}' does not exist")
    try:
        info = sf.info(path)
    except Exception as exc:
        raise AudioMoEError(
            f"{origin}: cannot read audio file '{path}' (corrupt or unsupported format): {exc}"
        ) from exc
    return info.frames / float(info.samplerate)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that names a key twice is refused (json keeps the last value, silently)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def parse_line(text: str, origin: str) -> Any:
    """One JSON line; bad JSON, a key given twice, or absurd nesting are named with ``origin``."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise AudioMoEError(
            f"{origin}: key {short_repr(exc.args[0])} appears twice in one object; keep one "
            "(JSON would silently keep the last)"
        ) from None
    except json.JSONDecodeError as exc:
        raise AudioMoEError(f"{origin}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, thousands of nested brackets
        raise AudioMoEError(f"{origin}: not a usable JSON line ({short_repr(str(exc))})") from None


def _undecodable(path: Path, data: bytes, exc: UnicodeDecodeError, how: str, lineno: int = 0) -> AudioMoEError:
    """The error for bytes that are not UTF-8: file, line and column (``data``: the file, or line ``lineno``)."""
    start = data.rfind(b"\n", 0, exc.start) + 1
    line = lineno or data.count(b"\n", 0, exc.start) + 1
    return AudioMoEError(
        f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start - start + 1}; "
        f"Latin-1 or another legacy encoding?): save the file as UTF-8 ({how})"
    )


def read_text_file(path: Path, what: str, how: str) -> str:
    """A UTF-8 text file (a BOM, as Excel writes, is dropped); a missing or undecodable file is a named error."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AudioMoEError(f"{what} file '{path}' does not exist; check the path") from None
    except IsADirectoryError:
        raise AudioMoEError(f"{what} file '{path}' is a directory; give the file inside it") from None
    except OSError as exc:  # a link loop, no permission
        raise AudioMoEError(f"cannot read {what} file '{path}': {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _undecodable(path, data, exc, how) from None


def resolve_path(root: Path, rel: str, origin: str) -> str:
    """``root / rel`` as an absolute path; a NUL byte or a link loop in it is named with ``origin``."""
    try:
        return str((root / rel).resolve())
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise AudioMoEError(f"{origin}: unusable path {short_repr(rel)} ({exc}); fix it") from None


def validate_line(raw: Any, root: Path, origin: str, tasks: Optional[set[str]], check_files: bool) -> Item:
    """One manifest line (a parsed JSON object) as an :class:`Item`; every problem names ``origin``."""
    if not isinstance(raw, dict):
        raise AudioMoEError(f"{origin}: each line must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        hint = did_you_mean(unknown[0], FIELDS)
        raise AudioMoEError(
            f"{origin}: unknown column(s) {unknown}.{hint} Allowed: {', '.join(FIELDS)} (free fields go under 'meta')"
        )
    if not isinstance(raw.get("audio"), str) or not raw["audio"]:
        raise AudioMoEError(f"{origin}: 'audio' (a path relative to the manifest) is required")
    task = raw.get("task")
    if not isinstance(task, str) or not task:
        raise AudioMoEError(f"{origin}: 'task' is required (or set a task for the whole source in the data config)")
    if tasks is not None and task not in tasks:
        raise AudioMoEError(
            f"{origin}: unknown task '{task}'.{did_you_mean(task, tasks)} Known tasks: {', '.join(sorted(tasks))}"
        )
    path = resolve_path(root, raw["audio"], origin)
    offset = raw.get("offset", 0.0) or 0.0
    duration = raw.get("duration")
    for key, v in (("offset", offset), ("duration", duration)):
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0):
            raise AudioMoEError(f"{origin}: '{key}' must be a finite number of seconds >= 0, got {v!r}")
    if check_files and not os.path.exists(path):
        raise AudioMoEError(f"{origin}: audio file '{path}' does not exist")
    if duration is None:
        length = audio_info(path, origin)
        duration = length - float(offset)
        if duration <= 0 and offset:
            raise AudioMoEError(f"{origin}: offset {offset} s is past the end of '{path}' ({length:.3f} s long)")
    if duration <= 0:
        raise AudioMoEError(f"{origin}: zero-length clip '{path}' (duration {duration} s)")
    target = raw.get("target")
    for key in (
        "codes",
        "audio",
    ):  # codec codes (a .npy path) or the clip to encode into them: relative to the manifest
        if isinstance(target, dict) and isinstance(target.get(key), str):
            target = {**target, key: resolve_path(root, target[key], origin)}
    meta = raw.get("meta") or {}
    if not isinstance(meta, dict):
        raise AudioMoEError(f"{origin}: 'meta' must be an object, got {type(meta).__name__}")
    return Item(
        audio=path,
        task=task,
        target=target,
        offset=float(offset),
        duration=float(duration),
        prompt=raw.get("prompt"),
        dataset=str(raw.get("dataset") or ""),
        split=str(raw.get("split") or "train"),
        meta=meta,
        origin=origin,
    )


def read_manifest(
    path: str | os.PathLike,
    *,
    task: Optional[str] = None,
    tasks: Optional[Iterable[str]] = None,
    split: Optional[str] = None,
    only_tasks: Optional[Iterable[str]] = None,
    skip_bad: bool = False,
    check_files: bool = True,
) -> tuple[list[Item], list[str]]:
    """Read a JSONL manifest into items; return ``(items, problems skipped)``.

    ``task`` fills (and overrides) every line's task; ``tasks`` is the set of known task names (an
    unknown one is an error); ``split`` keeps only lines of that split, ``only_tasks`` only lines of
    those tasks. Every problem names the
    manifest file and line; with ``skip_bad`` the line is skipped and its problem returned.
    """
    path = Path(path)
    if not path.exists():
        raise AudioMoEError(f"manifest '{path}' does not exist")
    root = path.parent
    known = set(tasks) if tasks is not None else None
    only = set(only_tasks or ())
    items: list[Item] = []
    bad: list[str] = []
    other_tasks: dict[str, int] = {}  # lines of the split left out by only_tasks, by task: named when nothing is left
    splits: dict[str, int] = {}  # every line's split: named when the one asked for has none
    with open(path, "rb") as fh:  # bytes: a line that is not UTF-8 is named, not a raw UnicodeDecodeError
        for lineno, data in enumerate(fh, 1):
            if not data.strip():
                continue
            origin = f"{path}:{lineno}"
            try:
                try:
                    line = data.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise _undecodable(path, data, exc, "or fix that line", lineno) from None
                raw = parse_line(line, origin)
                if isinstance(raw, dict):
                    raw_split = raw.get("split") or "train"  # a line without a split is a training line
                    if not isinstance(raw_split, str):
                        raise AudioMoEError(f"{origin}: 'split' must be a string, got {short_repr(raw_split)}")
                    splits[raw_split] = splits.get(raw_split, 0) + 1
                    line_task = (
                        raw.get("task") if isinstance(raw.get("task"), str) else None
                    )  # a list cannot be looked up
                if isinstance(raw, dict) and (
                    split is not None and raw_split != split or only and line_task not in only
                ):
                    if only and (split is None or raw_split == split):
                        other_tasks[str(raw.get("task"))] = other_tasks.get(str(raw.get("task")), 0) + 1
                    continue
                if task is not None and isinstance(raw, dict):
                    raw["task"] = task
                items.append(validate_line(raw, root, origin, known, check_files))
            except AudioMoEError as exc:
                if not skip_bad:
                    raise
                bad.append(str(exc))
    if not items:
        what = f" with split '{split}'" if split is not None else ""
        if other_tasks:
            have = ", ".join(f"'{t}' ({n})" for t, n in sorted(other_tasks.items()))
            raise AudioMoEError(
                f"manifest '{path}' has no items{what} for task(s) {sorted(only)}, only for {have}: a model's heads read the "
                "items of their own task name; name the head as the manifest's task (e.g. --set tasks.<task>=classification) "
                "or write the manifest with the head's name (audiomoe data from-csv ... --task <head>)"
            )
        found = (
            f"; its lines' splits: {', '.join(f'{s!r} ({n})' for s, n in sorted(splits.items()))}"
            if split is not None and splits
            else ""
        )
        if found and split not in splits:  # a split the data does not have: name the ones it has
            raise AudioMoEError(
                f"manifest '{path}' has no usable items{what}: no line has that split{found}; "
                "pick one of them (eval: --split NAME)"
            )
        raise AudioMoEError(f"manifest '{path}' is empty: no usable items{what} ({len(bad)} bad lines skipped){found}")
    return items, bad


def write_manifest(items: Iterable[Item], path: str | os.PathLike) -> Path:
    """Write items as JSONL with ``audio`` relative to the manifest's folder (sorted keys: stable bytes), atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AudioMoEError(f"cannot create the folder of manifest '{path}': {exc.strerror or exc}") from None
    root = path.parent.resolve()
    with atomic_open(path, what="manifest") as fh:  # a full disk mid-write leaves the old manifest, not half a new one
        for it in items:
            fh.write(json.dumps(it.to_json(root), sort_keys=True, ensure_ascii=False) + "\n")
    return path
