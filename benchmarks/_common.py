"""Helpers shared by the benchmark scripts: the size flags (``--quick``, ``--smoke``), component builders,
interleaved timing (with an optional CPU contention guard), fwd / fwd+bwd case builders, and the JSON-lines
report of the convention."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable, Optional

import torch

import audiomoe

#: the run sizes every benchmark offers: the full measurement, ``--quick`` (reduced, under a minute) and
#: ``--smoke`` (smallest sizes, one repetition, the same code paths: seconds; CI runs it)
MODES = ("full", "quick", "smoke")
#: set by :func:`mode_of` for smoke runs: :func:`measure` then skips its warm-up round and the guard's wait
#: for a quiet machine (a shared CI machine is rarely quiet, and a smoke run's timings are not figures anyone reads)
SMOKE = {"on": False}


def add_mode_flags(ap: argparse.ArgumentParser, quick_help: str) -> None:
    """Add the mutually exclusive ``--quick`` and ``--smoke`` flags to a benchmark's parser."""
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help=quick_help)
    group.add_argument(
        "--smoke", action="store_true", help="smallest sizes, 1 repetition, same code paths and checks (seconds; CI)"
    )


def mode_of(args: argparse.Namespace) -> str:
    """The run size chosen by the flags (one of :data:`MODES`); a smoke run turns :data:`SMOKE` on and uses one thread.

    One thread: on a loaded machine (CI, other jobs) OpenMP's spinning threads slow tiny ops by 5x and more
    (measured: a 30 s smoke run took 2 min 45 s with torch's default 2 threads while other processes ran).
    """
    mode = "smoke" if getattr(args, "smoke", False) else "quick" if getattr(args, "quick", False) else "full"
    SMOKE["on"] = mode == "smoke"
    if SMOKE["on"]:
        torch.set_num_threads(1)
    return mode


def builder(kind: str, name: str, **params) -> "audiomoe.Builder":
    """A Builder for a registered component (what the composer would inject into a parent)."""
    return audiomoe.component_builder(kind, {"name": name, "params": params})


def _cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine incl. steal, this process's user+system jiffies)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    busy = sum(v) - v[3] - v[4]  # minus idle and iowait; steal counts as busy
    with open("/proc/self/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return busy, int(f[11]) + int(f[12])


def other_load(seconds: float = 0.2) -> float:
    """CPUs' worth of work done by other processes (and the hypervisor) over ``seconds``."""
    b0, s0 = _cpu_jiffies()
    time.sleep(seconds)
    b1, s1 = _cpu_jiffies()
    return ((b1 - b0) - (s1 - s0)) / (seconds * os.sysconf("SC_CLK_TCK"))


def _timed(fn: Callable[[], object]) -> tuple[float, bool]:
    """(seconds, clean): clean when other processes used < 0.25 CPU meanwhile (contention guard)."""
    b0, s0 = _cpu_jiffies()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    b1, s1 = _cpu_jiffies()
    other = ((b1 - b0) - (s1 - s0)) / os.sysconf("SC_CLK_TCK")
    return dt, other < 0.25 * dt + 0.02


GUARD_STATS = {"reps": 0, "clean": 0}


def measure(
    cases: dict[Any, Callable[[], object]], reps: int, device: Optional[torch.device] = None, guard: bool = False
) -> dict[Any, float]:
    """Median seconds per case; repetitions round-robin interleaved across cases (one warm-up each, none in smoke runs).

    ``guard`` (CPU, Linux): before each round wait (up to 10 s; not in smoke runs) for the machine to be quiet, and drop
    repetitions during which other processes used CPU when at least 3 clean ones remain (counted in
    ``GUARD_STATS``). On CUDA every repetition is synchronised.
    """
    cuda = device is not None and device.type == "cuda"
    if not SMOKE["on"]:  # warm-up round
        for fn in cases.values():
            fn()
    samples: dict[Any, list[tuple[float, bool]]] = {name: [] for name in cases}
    for _ in range(reps):
        if guard and not SMOKE["on"]:
            deadline = time.time() + 10
            while other_load() > 0.1 and time.time() < deadline:
                pass
        for name, fn in cases.items():
            if cuda:
                torch.cuda.synchronize()
            if guard:
                samples[name].append(_timed(fn))
                continue
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - t0, True))
    out = {}
    for name, v in samples.items():
        clean = [t for t, ok in v if ok]
        if guard:
            GUARD_STATS["reps"] += len(v)
            GUARD_STATS["clean"] += len(clean)
        out[name] = statistics.median(clean if len(clean) >= 3 else [t for t, _ in v])
    return out


def fwd_case(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    """A timed case: ``fn(x)`` under ``no_grad``."""

    def run() -> None:
        with torch.no_grad():
            fn(x)

    return run


def fwd_bwd_case(fn: Callable[[torch.Tensor], torch.Tensor], xg: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """A timed case: ``fn(xg)`` then backward of ``g`` into ``xg`` and the parameters."""

    def run() -> None:
        xg.grad = None
        out = fn(xg)
        if out.requires_grad:  # e.g. all picks null and no shared expert: a constant zero output
            out.backward(g)

    return run


class Report:
    """The benchmark JSON-lines convention: a header line, then one line per ``emit``."""

    def __init__(self, bench: str, mode: str, device: str = "cpu", digits: Optional[int] = 4) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.bench, self.digits = bench, digits
        header = {
            "bench": bench,
            "header": True,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": device,
        }
        self.lines: list[dict] = [{**header, "quick": mode == "quick", "mode": mode}]

    def emit(self, case: str, metric: str, value: float, unit: str) -> None:
        """Record one figure (ratios with ``unit="x"``)."""
        value = round(float(value), self.digits) if self.digits is not None else value
        self.lines.append({"bench": self.bench, "case": case, "metric": metric, "value": value, "unit": unit})

    def write(self, path: Optional[str]) -> None:
        """Write the lines to ``path`` (nothing when ``path`` is empty)."""
        if path:
            with open(path, "w", encoding="utf-8") as fh:
                for line in self.lines:
                    fh.write(json.dumps(line) + "\n")


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table: ``header`` over a dashed rule, then ``rows``, columns padded to their widest cell."""
    w = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    return "\n".join(
        ["  ".join(h.ljust(x) for h, x in zip(header, w)), "  ".join("-" * x for x in w)]
        + ["  ".join(str(c).ljust(x) for c, x in zip(r, w)) for r in rows]
    )
