"""Router cost as a fraction of the MoE layer it serves: forward+backward time, side by side.

Point (issue 3/4, fine-grained): d=1024, 32 routed experts (SwiGLU, width 128), 16k tokens;
routers ``top_k`` (k=2), ``top_p`` (p=0.7, renormalised weights, UniMoE aux loss), and ``top_p`` with
UniMoE code's SparseMixer weights (``linear_topk`` is now a deprecated alias of ``top_k``: not timed twice). For each router the MoE layer
(``audiomoe.moe.layer.MoELayer``, the registered ``swiglu`` expert) is timed whole
(router + dispatch + experts + combine, forward+backward) and the router alone (forward+backward
through its combine weights and aux losses); the ratio router/layer is the figure (target < 10%).

A freshly initialised gate gives near-uniform probabilities, for which top-p keeps ~ceil(0.7*32)=23
experts per token; a trained router is far peakier. So the top-p gate is scaled until tokens pick
about 2 experts on average (reported as ``experts_per_token``), which makes the layer comparable
with top-2 and the ratio a fair (pessimistic) one.

``--quick``: 2k tokens, 3 repetitions; ``--smoke``: d=64, 8 experts of width 32, 256 tokens, 1 repetition
(the same routers, calibration and timing: seconds).

Usage: python benchmarks/router.py [--quick | --smoke] [--json FILE] [--reps N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import torch

from audiomoe.moe.layer import MoELayer

from _common import Report, add_mode_flags, builder, measure, mode_of

BENCH = "router"


def calibrate_top_p(layer: MoELayer, x: torch.Tensor, target: float = 2.0) -> float:
    """Scale the gate until tokens pick ~``target`` columns on average; return the scale."""
    w = layer.router.scorer.layers[0].weight  # the linear scorer's gate (top_p's default scorer)
    base = w.detach().clone()
    lo, hi = 1.0, 256.0
    with torch.no_grad():
        for _ in range(20):
            mid = (lo * hi) ** 0.5
            w.copy_(base * mid)
            k = float(layer.router(x[:2048]).mask.sum(-1).float().mean())
            lo, hi = (mid, hi) if k > target else (lo, mid)
        w.copy_(base * hi)
    return hi


def moe_layer(router: dict, d: int, e: int, f: int) -> MoELayer:
    """The registered ``moe`` layer with ``router`` (a component spec) and ``e`` SwiGLU experts of width ``f``."""
    params = {"router": router, "num_experts": e, "expert": {"name": "swiglu", "params": {"d_ff": f}}}
    return builder("moe", "moe", **params)(d_model=d)


def run_point(name: str, router: dict, d: int, e: int, f: int, t: int, reps: int, device: torch.device, emit) -> None:
    """Time the whole layer and its router alone (fwd+bwd) for one routing policy; print and emit the share."""
    torch.manual_seed(0)
    layer = moe_layer(router, d, e, f).to(device).train()
    x = torch.randn(t, d, device=device)
    if router["name"] == "top_p":
        calibrate_top_p(layer, x)
    coeff = torch.randn(t, e, device=device)

    def whole() -> None:
        xi = x.detach().requires_grad_(True)
        y, r = layer(xi)
        loss = y.float().pow(2).mean() + sum(r.aux_losses.values(), torch.zeros((), device=device))
        loss.backward()

    def router_only() -> None:
        xi = x.detach().requires_grad_(True)
        r = layer.router(xi)
        loss = (r.weights * coeff).sum() + sum(r.aux_losses.values(), torch.zeros((), device=device))
        loss.backward()

    with torch.no_grad():
        k_mean = float(layer.router(x).mask.sum(-1).float().mean())
    times = measure({"layer": whole, "router": router_only}, reps, device)
    layer.zero_grad(set_to_none=True)
    ratio = times["router"] / times["layer"]
    emit(name, "layer_fwd_bwd", times["layer"] * 1e3, "ms")
    emit(name, "router_fwd_bwd", times["router"] * 1e3, "ms")
    emit(name, "router_share", ratio, "x")
    emit(name, "experts_per_token", k_mean, "experts")
    print(
        f"{name:<24} {t:>6} {k_mean:>8.2f} {times['layer'] * 1e3:>10.1f} {times['router'] * 1e3:>10.1f} {100 * ratio:>8.1f}%"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mode_flags(ap, "2k tokens, 3 repetitions (same code paths)")
    ap.add_argument("--json", metavar="FILE", help="also write JSON lines here")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per case (median reported)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    mode = mode_of(args)
    device = torch.device(args.device)
    d, e, f, t = {"full": (1024, 32, 128, 16384), "quick": (1024, 32, 128, 2048), "smoke": (64, 8, 32, 256)}[mode]
    reps = args.reps or {"full": 5, "quick": 3, "smoke": 1}[mode]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(BENCH, mode, where, digits=None)
    emit = report.emit

    print(
        f"router cost vs MoE layer: d={d}, {e} experts (swiglu {f}), fwd+bwd, median of {reps}, {where}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'case':<24} {'tokens':>6} {'k/token':>8} {'layer ms':>10} {'router ms':>10} {'share':>9}")
    cases = {
        "top_k(k=2)": {"name": "top_k", "params": {"k": 2}},
        "top_p(p=0.7)": {"name": "top_p", "params": {"p": 0.7}},
        "top_p(p=0.7,unimoe_code)": {
            "name": "top_p",
            "params": {"selector": {"name": "top_p", "params": {"p": 0.7, "weights": "unimoe_code"}}},
        },
    }
    for name, router in cases.items():
        run_point(name, router, d, e, f, t, reps, device, emit)
    report.write(args.json)


if __name__ == "__main__":
    main()
