"""Plan tuning: time every dispatch plan on a model's own MoE layer shapes, once, and write the plan table.

The dispatcher never times anything inside ``forward`` (two ranks timing on their own could pick
different plans and so different numerics); this is where the timing happens instead, outside
training: :func:`tune_plans` builds one copy of each distinct MoE layer shape of a model (device,
dtype, width, expert width, expert count: :func:`audiomoe.moe.dispatcher.plan_key`), routes
random tokens through the layer's own router, checks each plan's output against the reference
``loop`` and times fwd+bwd (weight gradients set to None before each, as a training step after
``zero_grad()``). The fastest plan per shape goes into a JSON table that ``moe.plan_table`` reads,
so every rank of a run reads the same plans. ``audiomoe bench moe MODEL --tune FILE`` runs it.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.moe.dispatcher import GATHER_LIMIT, PLANS, grouped_mm_usable, plan_key
from audiomoe.moe.grouped import GroupedSwiGLU
from audiomoe.moe.layer import MoELayer


@dataclass
class PlanTiming:
    """One plan on one layer shape: median fwd+bwd seconds (None: not run, see ``note``) and max |diff| vs loop."""

    key: str
    plan: str
    seconds: Optional[float]
    max_diff: float = 0.0
    note: str = ""


def distinct_layers(model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, MoELayer]:
    """The model's MoE layers, one per plan-table key (the first of each shape)."""
    out: dict[str, MoELayer] = {}
    for m in model.modules():
        if isinstance(m, MoELayer):
            out.setdefault(plan_key(device, dtype, m.experts), m)
    return out


def _runnable(plan: str, layer: MoELayer, tokens: int, device: torch.device, dtype: torch.dtype) -> str:
    """'' when ``plan`` can run this layer here, else why not."""
    ex = layer.experts
    if plan != "loop" and not isinstance(ex, GroupedSwiGLU):
        return f"{type(ex).__name__} experts have no grouped form"
    if plan == "xformers" and device.type != "cuda":
        return "xformers plan is CUDA only"
    if plan == "grouped_mm" and not grouped_mm_usable(ex.d_model, ex.d_ff, dtype):
        return "F.grouped_mm unavailable or widths not 16-byte multiples"
    if plan in ("dense", "gathered") and tokens * len(ex) * 3 * ex.d_model * ex.d_ff > 64 * GATHER_LIMIT:
        return "a decoding-step plan: far more work than the routed pairs at this many tokens"
    return ""


def _median_fwd_bwd(layer: MoELayer, x: torch.Tensor, routing, reps: int) -> float:
    xg, g = x.clone().requires_grad_(True), torch.randn_like(x)
    samples = []
    for i in range(reps + 1):  # the first is a warm-up (scratch buffers, allocator, kernels)
        layer.zero_grad(set_to_none=True)
        xg.grad = None
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        layer.combine(xg, routing).backward(g)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def tune_plans(
    model: nn.Module,
    tokens: int = 4096,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    reps: int = 5,
    progress: Callable[[str], None] = lambda s: None,
) -> tuple[dict[str, str], list[PlanTiming]]:
    """Time every runnable plan on each distinct MoE layer shape of ``model``: ``(plan table, timings)``.

    A plan whose output differs from ``loop`` by more than the dtype's tolerance is reported and never chosen.
    """
    dev = torch.device(device)
    layers = distinct_layers(model, dev, dtype)
    if not layers:
        raise AudioMoEError("this model has no MoE layer (backbone.moe / an upcycled LM): nothing to tune")
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    table, rows = {}, []
    for key, original in layers.items():
        if not isinstance(original.experts, GroupedSwiGLU):
            rows.append(
                PlanTiming(
                    key,
                    "loop",
                    None,
                    note=f"{type(original.experts).__name__} experts run only the loop plan: nothing to tune",
                )
            )
            continue
        layer = copy.deepcopy(original).to(dev, dtype).train()
        layer.ep_shard = None
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, layer.d_model, generator=gen).to(dev, dtype)
        with torch.no_grad():
            try:
                routing = layer.router(x, item_mask=None)
            except (TypeError, AudioMoEError):  # a task-conditioned router: every token of task 0
                routing = layer.router(x, item_mask=None, task_ids=torch.zeros(tokens, dtype=torch.long, device=dev))
            routing.null_columns = layer.num_null
        reference = None
        timed: dict[str, float] = {}
        for plan in ("loop", *(p for p in PLANS if p != "loop")):
            why = _runnable(plan, layer, tokens, dev, dtype)
            if why:
                rows.append(PlanTiming(key, plan, None, note=why))
                continue
            layer.dispatcher.plan = plan
            with torch.no_grad():
                out = layer.combine(x, routing).float()
            reference = out if reference is None else reference
            diff = float((out - reference).abs().max())
            if diff > tol * max(1.0, float(reference.abs().max())):
                rows.append(PlanTiming(key, plan, None, diff, f"output differs from loop by {diff:.2e}: not chosen"))
                continue
            timed[plan] = _median_fwd_bwd(layer, x, routing, reps)
            rows.append(PlanTiming(key, plan, timed[plan], diff))
            progress(f"{key}  {plan:<10} fwd+bwd {timed[plan] * 1e3:9.2f} ms  max|diff| vs loop {diff:.1e}")
        table[key] = min(timed, key=timed.__getitem__)
    return table, rows
