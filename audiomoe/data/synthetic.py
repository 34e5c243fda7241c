"""Synthetic multi-task audio for smoke training and tests: tones whose pitch encodes the label.

Class ``c`` of a task is a sum of two harmonics at ``f_c = base * ratio**c`` Hz with a random
phase, amplitude, onset and additive noise, in clips of random length. Every classification head
of a model gets its own base frequency, so a multi-task model has to keep the tasks apart. The
generator is seeded: the same seed gives the same batches.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from audiomoe.core.batch import AudioBatch


def tone_batch(
    task_classes: dict[str, int],
    batch_size: int,
    sample_rate: int = 16000,
    seconds: tuple[float, float] = (0.3, 0.6),
    generator: torch.Generator | None = None,
) -> AudioBatch:
    """One batch of tones: each item picks a task and a class; lengths vary within ``seconds``."""
    if not task_classes:
        raise ValueError("tone_batch needs at least one classification task")
    g = generator or torch.Generator().manual_seed(0)
    names = sorted(task_classes)
    max_len = int(seconds[1] * sample_rate)
    wav = torch.zeros(batch_size, max_len)
    lengths = torch.empty(batch_size, dtype=torch.long)
    tasks, targets = [], []
    for i in range(batch_size):
        t_idx = int(torch.randint(len(names), (1,), generator=g))
        name = names[t_idx]
        c = int(torch.randint(task_classes[name], (1,), generator=g))
        base = 180.0 * (1.0 + 0.37 * t_idx)
        f = base * (1.32**c)
        n = int(torch.randint(int(seconds[0] * sample_rate), max_len + 1, (1,), generator=g))
        t = torch.arange(n) / sample_rate
        phase = float(torch.rand((), generator=g)) * 2 * math.pi
        amp = 0.2 + 0.6 * float(torch.rand((), generator=g))
        x = amp * (torch.sin(2 * math.pi * f * t + phase) + 0.5 * torch.sin(4 * math.pi * f * t + phase))
        x = x + 0.05 * torch.randn(n, generator=g)
        wav[i, :n] = x
        lengths[i] = n
        tasks.append(name)
        targets.append(c)
    return AudioBatch(wav, sample_rate, tasks, lengths, targets)


def tone_stream(
    task_classes: dict[str, int], batch_size: int, sample_rate: int = 16000, seed: int = 0
) -> Iterator[AudioBatch]:
    """An endless, seeded stream of :func:`tone_batch` batches."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield tone_batch(task_classes, batch_size, sample_rate, generator=g)


def classification_tasks(model: torch.nn.Module, names: Sequence[str]) -> dict[str, int]:
    """``{task: num_classes}`` for the single-label classification heads among ``names``."""
    out = {}
    for name in names:
        p = getattr(model.heads[name], "params", None)
        if p is not None and hasattr(p, "num_classes") and not getattr(p, "multi_label", False):
            out[name] = int(p.num_classes)
    return out
