"""How ``predict`` and ``eval`` feed a clip longer than one forward should take: bounded memory, never a silent crop.

A clip-level head's label holds for any window of its clip (``Task.clip_level``, the rule training
crops by), so a longer clip is cropped to a window of ``max_seconds``, and only that window is read
from disk. Any other head (a transcript, an answer, codec codes) is scored on, or answers for, the
whole clip: a longer one is refused before any work, naming the clip, the limit and the flag that
raises it (``--max-seconds``), so memory follows the limit the user chose, never the file's length.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from audiomoe.core.errors import AudioMoEError

DEFAULT_MAX_SECONDS = 30.0
"""The longest audio one item feeds the model in ``predict`` / ``eval`` by default (Whisper's window)."""


def check_max_seconds(max_seconds: Any) -> float:
    """``max_seconds`` as a float, or an error: it must be a positive, finite number of seconds."""
    try:
        value = float(max_seconds)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(max_seconds, bool) or not (math.isfinite(value) and value > 0):
        raise AudioMoEError(f"--max-seconds must be a positive number of seconds, got {max_seconds!r}")
    return value


def clip_level_tasks(model: Any) -> list[str]:
    """The model's heads whose clips may be cropped (their label holds for any window of the clip)."""
    return [t for t in model.task_names if getattr(model.heads[t], "clip_level", False)]


def refuse_long_clips(model: Any, clips: Iterable[tuple[str, str, float]], max_seconds: float, command: str) -> None:
    """Raise for the first ``(where, task, seconds)`` over ``max_seconds`` whose head is not clip-level."""
    from audiomoe.train.data import _head_kind

    cropped = set(clip_level_tasks(model))
    long: list[tuple[str, str, float]] = [c for c in clips if c[1] not in cropped and c[2] > max_seconds]
    if not long:
        return
    where, task, seconds = max(long, key=lambda c: c[2])
    more = f" ({len(long) - 1} more such clip(s))" if len(long) > 1 else ""
    raise AudioMoEError(
        f"{where} is {seconds:.1f} s long{more}, over the {max_seconds:g} s limit of `audiomoe {command}` for head "
        f"'{task}' ({_head_kind(model, task)}): it takes whole clips (only clip-level labels are cropped), so it is "
        f"not cut; split the audio into shorter clips, or raise the limit with --max-seconds {math.ceil(seconds)} "
        "(memory grows with the length)"
    )


def item_clips(items: Sequence[Any]) -> list[tuple[str, str, float]]:
    """``(where, task, seconds)`` of manifest items, for :func:`refuse_long_clips`."""
    return [(f"{it.origin}: clip '{it.audio or 'embedded audio'}'", it.task, float(it.duration)) for it in items]
