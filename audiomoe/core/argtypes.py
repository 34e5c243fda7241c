"""Numeric command-line flags with a declared range: ``type=int_in(1, MAX_BATCH_SIZE)``.

argparse calls the type on the flag's text; a value outside the range becomes argparse's own one-line
error (``argument --batch-size: must be an integer >= 1, got '0'``, exit 2) before any work starts.
Ranges match what the recipe and the trainer validate, so a flag never accepts what a run refuses.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _span(lo: Optional[float], hi: Optional[float], lo_open: bool = False) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {_num(lo or 0)}"
    if lo is None:
        return f"<= {_num(hi)}"
    return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}]"


def int_in(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[lo, hi]`` (``None``: unbounded on that side)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            value = None
        if value is None or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_span(lo, hi)}, got {text!r}")
        return value

    parse.__name__ = "integer"  # what argparse names in its own messages
    return parse


def float_in(
    lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
        if not math.isfinite(value) or bad_lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be a finite number {_span(lo, hi, lo_open)}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


positive_int = int_in(1)
"""An integer >= 1 (repetitions, tokens, processes)."""
nonneg_int = int_in(0)
"""An integer >= 0 (0 usually meaning "off" or "all")."""

__all__ = ["float_in", "int_in", "nonneg_int", "positive_int"]
