"""Optimizer, learning-rate schedule, clipping and precision for one stage.

The optimizer is AdamW over the tensors the stage trains, one param group per lr multiplier
(``optim.lr_mult``). The learning rate is a pure function of the stage's step (:func:`lr_factor`),
written into every group before each optimizer step: nothing but the step has to be saved for an
exact resume (no scheduler object, nothing pickled).

Precision: ``bf16`` runs the forward under ``torch.autocast`` in bfloat16 (CUDA, and on CPU where
torch supports it: it does for the layers used here), weights and optimizer state stay float32;
``fp32`` runs everything in float32.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import torch

from audiomoe.train.recipe import OptimSpec, ScheduleSpec


def lr_factor(step: int, total: int, schedule: ScheduleSpec) -> float:
    """Multiplier of the peak lr at 1-based ``step`` of ``total``: linear warmup, then the decay kind.

    Warmup reaches 1 at ``step == warmup``; decay runs from there to ``total`` and ends at
    ``min_lr_ratio`` (linear / cosine); ``constant`` stays at 1.
    """
    w = schedule.warmup_steps(total)
    if w and step <= w:
        return step / w
    if schedule.kind == "constant" or total <= w:
        return 1.0
    t = min(max((step - w) / (total - w), 0.0), 1.0)
    lo = schedule.min_lr_ratio
    if schedule.kind == "linear":
        return 1.0 - (1.0 - lo) * t
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_optimizer(
    named: Iterable[tuple[str, torch.nn.Parameter]], spec: OptimSpec, mults: dict[str, float]
) -> torch.optim.AdamW:
    """AdamW over ``named`` parameters, grouped by lr multiplier (groups keep a stable order)."""
    by_mult: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in named:
        by_mult.setdefault(mults.get(name, 1.0), []).append(p)
    groups = [{"params": ps, "lr_mult": m, "lr": spec.lr * m} for m, ps in sorted(by_mult.items())]
    # foreach=False: the same per-tensor kernels on every run and after every resume
    return torch.optim.AdamW(
        groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay, foreach=False
    )


def set_lr(opt: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Write ``base_lr * factor * group multiplier`` into every group; return the base value."""
    lr = base_lr * factor
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


def clip_and_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The global gradient norm (before clipping); clipped to ``max_norm`` when given and finite.

    A non-finite norm leaves the gradients as they are: clipping by it would turn every gradient
    into NaN and hide which parameter went bad (the step loop names it, then stops or skips).
    """
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is not None:
        # torch's clip_grad_norm_ is exactly these two calls: the same numbers as before
        total = torch.nn.utils.get_total_norm([p.grad for p in grads], foreach=False)
        if bool(torch.isfinite(total)):
            torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total, foreach=False)
        return float(total)
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in grads]))
    )


def autocast(precision: str, device: torch.device) -> Any:
    """The forward's autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
