"""Where one fwd+bwd of the MoE layer spends its time against the dense layer: profiler self-CPU time per op category.

Used by ``benchmarks/moe_layer.py`` at its fine point (one profiled run each, after one warm run).
"""

from __future__ import annotations

import torch

from _common import fwd_bwd_case

#: profiler op name -> the category the fine-point breakdown reports it under
CATEGORIES = {
    "GEMM": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
    "gather / scatter": ("aten::index_select", "aten::index_add_", "aten::scatter_add_", "aten::index", "aten::index_put_"),
    "fill / copy": ("aten::fill_", "aten::zero_", "aten::copy_", "aten::cat", "aten::clone"),
    "elementwise": ("aten::silu", "aten::silu_backward", "aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::sum"),
}  # fmt: skip


def breakdown(label: str, impls: dict, xg: torch.Tensor, g: torch.Tensor, emit) -> None:
    """Where one fwd+bwd spends its time, moe vs dense: profiler self-CPU time per op category (one profiled run each)."""
    from torch.profiler import ProfilerActivity, profile

    rows = {}
    for name in ("dense", "moe"):
        run = fwd_bwd_case(impls[name], xg, g)
        run()  # warm: scratch buffers, allocator
        # one cycle, so acc_events changes nothing but torch's "clears events" warning
        with profile(activities=[ProfilerActivity.CPU], acc_events=True) as prof:
            run()
        cat = dict.fromkeys([*CATEGORIES, "other (dispatch, Python, autograd)"], 0.0)
        for ev in prof.key_averages():
            key = next((c for c, ops in CATEGORIES.items() if ev.key in ops), "other (dispatch, Python, autograd)")
            cat[key] += ev.self_cpu_time_total / 1e3
        rows[name] = cat
    print(f"\n{label}: fwd+bwd self-CPU ms by op category (torch.profiler, one run each; profiling adds overhead)")
    print(f"{'':>36} {'dense':>8} {'moe':>8} {'moe - dense':>12}")
    for key in rows["dense"]:
        a, b = rows["dense"][key], rows["moe"][key]
        emit(label, f"breakdown_ms_{key.split(' ')[0]}_dense", a, "ms")
        emit(label, f"breakdown_ms_{key.split(' ')[0]}_moe", b, "ms")
        print(f"{key:>36} {a:8.1f} {b:8.1f} {b - a:+12.1f}")
