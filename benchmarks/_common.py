"""Helpers shared by the benchmark scripts: component builders and interleaved timing."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

import audiomoe


def builder(kind: str, name: str, **params) -> "audiomoe.Builder":
    """A Builder for a registered component (what the composer would inject into a parent)."""
    return audiomoe.component_builder(kind, {"name": name, "params": params})


def measure(cases: dict[str, Callable[[], object]], reps: int, device: Optional[torch.device] = None) -> dict[str, float]:
    """Median seconds per case; repetitions round-robin interleaved across cases (one warm-up each)."""
    cuda = device is not None and device.type == "cuda"
    for fn in cases.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}
