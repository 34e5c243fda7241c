"""Training progress: a tqdm bar on a terminal, one plain line every N steps elsewhere, nothing when quiet.

Off a terminal (a log file, CI, a pipe) a redrawn bar is a flood of carriage returns; there a
line ``step 20/200  loss 1.234  8.1 steps/s`` is printed every ``every`` steps and at the last.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, Optional, TextIO


class Progress:
    """Reports steps of a run on ``stream`` (stderr by default); ``mode`` is ``bar``, ``lines`` or ``off``."""

    def __init__(
        self, total: int, start: int = 0, mode: str = "auto", every: int = 0, stream: Optional[TextIO] = None
    ) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.total, self.start = mode, total, start
        self.every = every if every > 0 else max(1, (total - start) // 10)
        self.t0 = time.perf_counter()
        self._bar: Any = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, file=self.stream)

    def step(self, step: int, loss: float, tasks: Optional[Mapping[str, float]] = None) -> None:
        """Record that ``step`` finished with ``loss``; ``tasks``: that step's loss per task present.

        The total is the sum over the tasks a batch holds, so it jumps with the batch's mix: with two
        to four tasks present the line also names each (``loss 137.2 (tts 68.1, music 69.1)``).
        """
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}")
        elif self.mode == "lines" and (step % self.every == 0 or step == self.total):
            rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
            parts = (
                f" ({', '.join(f'{t} {v:.4g}' for t, v in tasks.items())})" if tasks and 2 <= len(tasks) <= 4 else ""
            )
            print(f"step {step}/{self.total}  loss {loss:.4f}{parts}  {rate:.1f} steps/s", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A one-line message (resumed from ..., eval results); silent when quiet."""
        if self.mode == "off":
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
