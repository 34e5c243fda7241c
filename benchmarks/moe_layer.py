"""MoE layer speed against its limits: forward and forward+backward time, side by side in one process.

Compared at each point (all float32, same weights and tokens):
  - ``moe``: audiomoe's MoELayer (sorted dropless dispatch, fused SwiGLU experts), via ``layer.combine``;
  - ``dense``: a SwiGLU FFN of hidden ``k * d_ff`` on every token = exactly the active FLOPs (the limit, 1.0);
  - ``hf_loop``: the per-expert masked loop of Hugging Face's Mixtral / Qwen-MoE sparse blocks
    (``one_hot`` -> ``torch.where`` per hit expert -> ``x[top_x]`` -> expert module -> ``index_add_``),
    written here following transformers' ``MixtralSparseMoeBlock.forward`` (ModuleList experts).
The routing is fixed: a linear top-k gate is computed once and its record reused, so the router does
not pollute the layer timing (the ratios are dispatch + experts + combine only; no router in any).
Points: fine-grained d=1024, 32 experts of width 128, top-2, 16k tokens; coarse d=512, 8 experts of
width 2048, top-2, 4k tokens. Then time vs null share: a fraction of the picks is moved to null
columns, and the time falls with the real picks. Then every dispatch plan on CPU at the fine point
(why ``auto`` takes ``fused`` there). On a CUDA machine a last section times every
dispatch plan (loop, fused, grouped matmul, slots with torch ops, slots with xformers' Triton
gather/scatter) in bf16 and prints each one's speed relative to the loop, its largest difference
from it, and what ``dispatch="auto"`` picked.

Usage: python benchmarks/moe_layer.py [--quick] [--json FILE] [--reps N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from audiomoe.core.interfaces import Routing
from audiomoe.experts.moe_layer import MoELayer

from _common import GUARD_STATS, Report, builder, fwd_bwd_case, fwd_case, measure

BENCH = "moe_layer"


def fixed_topk_routing(x: torch.Tensor, num_columns: int, k: int) -> Routing:
    """A linear top-k gate computed once (no grad): Mixtral-style renormalised weights."""
    gate = torch.randn(x.shape[1], num_columns) / x.shape[1] ** 0.5
    logits = x @ gate
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(k, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_i, True)
    return Routing(logits, mask, weights, top_i, mask.sum(0))


def hf_loop(x: torch.Tensor, experts, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
    """Hugging Face Mixtral/Qwen-MoE sparse block, expert part (transformers ``MixtralSparseMoeBlock``)."""
    final = torch.zeros_like(x)
    expert_mask = F.one_hot(top_i, num_classes=len(experts)).permute(2, 1, 0)
    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in expert_hit:
        idx, top_x = torch.where(expert_mask[e].squeeze(0))
        current = x[None, top_x].reshape(-1, x.shape[-1])
        hidden = experts[int(e)](current) * top_w[top_x, idx, None]
        final.index_add_(0, top_x, hidden.to(x.dtype))
    return final


def point(label: str, d: int, e: int, f: int, k: int, t: int, reps: int, emit) -> None:
    torch.manual_seed(0)
    layer = MoELayer(d_model=d, num_experts=e, router=builder("router", "linear_topk", k=k), expert=builder("expert", "swiglu", d_ff=f))
    dense = builder("expert", "swiglu", d_ff=k * f)(d_model=d)
    x = torch.randn(t, d)
    routing = fixed_topk_routing(x, e, k)
    top_w = routing.weights.gather(-1, routing.indices)
    xg = x.clone().requires_grad_(True)
    g = torch.randn(t, d)

    impls = {
        "moe": lambda inp: layer.combine(inp, routing),
        "dense": dense,
        "hf_loop": lambda inp: hf_loop(inp, layer.experts, routing.indices, top_w),
    }
    res_f = measure({n: fwd_case(fn, x) for n, fn in impls.items()}, reps, guard=True)
    res_b = measure({n: fwd_bwd_case(fn, xg, g) for n, fn in impls.items()}, reps, guard=True)
    row = [label]
    for phase, res in (("fwd", res_f), ("fwd+bwd", res_b)):
        for name, sec in res.items():
            emit(label, f"{phase}_{name}_ms", sec * 1e3, "ms")
        r_dense, r_hf = res["moe"] / res["dense"], res["hf_loop"] / res["moe"]
        emit(label, f"{phase}_moe_over_dense", r_dense, "x")
        emit(label, f"{phase}_hf_loop_over_moe", r_hf, "x")
        emit(label, f"{phase}_hf_loop_over_dense", res["hf_loop"] / res["dense"], "x")
        row += [f"{res['dense'] * 1e3:8.1f}", f"{res['moe'] * 1e3:8.1f}", f"{res['hf_loop'] * 1e3:8.1f}", f"{r_dense:5.2f}x", f"{r_hf:5.2f}x"]
    print("{:<34} | {:>8} {:>8} {:>8} {:>6} {:>6} | {:>8} {:>8} {:>8} {:>6} {:>6}".format(*row), flush=True)


def null_sweep(d: int, e: int, f: int, k: int, t: int, reps: int, emit, shares=(0.0, 0.25, 0.5, 0.75, 1.0)) -> None:
    """Time vs the share of picks that go to null columns (one null column per routed... here 4)."""
    torch.manual_seed(0)
    n_null = 4
    layer = MoELayer(
        d_model=d, num_experts=e, num_null=n_null, router=builder("router", "linear_topk", k=k), expert=builder("expert", "swiglu", d_ff=f)
    )
    x = torch.randn(t, d)
    base = fixed_topk_routing(x, e + n_null, k)
    logits = base.logits
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(t, k, generator=gen)
    top_i = logits[:, :e].topk(k, -1).indices
    null_i = e + torch.randint(0, n_null, (t, k), generator=gen)
    xg = x.clone().requires_grad_(True)
    g = torch.randn(t, d)
    routings = {}
    for share in shares:
        idx = torch.where(u < share, null_i, top_i)
        mask = torch.zeros(t, e + n_null, dtype=torch.bool).scatter(-1, idx, True)
        w = mask.float() / mask.sum(-1, keepdim=True)
        routings[share] = Routing(logits, mask, w, idx, mask.sum(0))

    cases = {s: (lambda inp, r=r: layer.combine(inp, r)) for s, r in routings.items()}
    res_f = measure({s: fwd_case(fn, x) for s, fn in cases.items()}, reps, guard=True)
    res_b = measure({s: fwd_bwd_case(fn, xg, g) for s, fn in cases.items()}, reps, guard=True)
    case = f"null_sweep d={d} E={e} f={f} k={k} T={t}"
    print(f"\n{case}  (time relative to no null picks)")
    print(f"{'null share':>10} {'real pairs':>10} {'fwd ms':>8} {'rel':>6} {'f+b ms':>8} {'rel':>6}")
    for s, r in routings.items():
        real = int(r.mask[:, :e].sum())
        emit(case, f"fwd_ms@null={s}", res_f[s] * 1e3, "ms")
        emit(case, f"fwd+bwd_ms@null={s}", res_b[s] * 1e3, "ms")
        emit(case, f"fwd_rel@null={s}", res_f[s] / res_f[shares[0]], "x")
        emit(case, f"fwd+bwd_rel@null={s}", res_b[s] / res_b[shares[0]], "x")
        print(f"{s:>10.2f} {real:>10} {res_f[s] * 1e3:>8.1f} {res_f[s] / res_f[shares[0]]:>5.2f}x {res_b[s] * 1e3:>8.1f} {res_b[s] / res_b[shares[0]]:>5.2f}x")


def plan_table(label: str, d: int, e: int, f: int, k: int, t: int, reps: int, emit, dev: torch.device, dtype: torch.dtype) -> None:
    """Every dispatch plan side by side (on CUDA also the slots plan through xformers' Triton ops).

    Prints fwd and fwd+bwd time relative to the ``loop`` plan and the largest absolute difference of
    the output from it, plus what ``dispatch="auto"`` picked for this shape.
    """
    from audiomoe.experts.backends import xformers_available

    torch.manual_seed(0)
    x = torch.randn(t, d, device=dev, dtype=dtype)
    routing = fixed_topk_routing(x.float().cpu(), e, k)
    routing = Routing(*(v.to(dev) for v in (routing.logits, routing.mask, routing.weights, routing.indices, routing.counts)))
    plans = [("loop", "torch"), ("fused", "torch"), ("grouped", "torch"), ("slots", "torch")]
    if dev.type == "cuda" and xformers_available():
        plans.append(("slots", "xformers"))
    layers, outs = {}, {}
    for plan, backend in plans:
        torch.manual_seed(0)
        layer = MoELayer(
            d_model=d, num_experts=e, router=builder("router", "linear_topk", k=k), expert=builder("expert", "swiglu", d_ff=f),
            backend=backend, dispatch=plan,
        ).to(dev, dtype)
        try:
            with torch.no_grad():
                outs[(plan, backend)] = layer.combine(x, routing).float()
            layers[(plan, backend)] = layer
        except Exception as exc:  # noqa: BLE001 - report a plan this GPU cannot run, keep the others
            print(f"  {plan}/{backend}: failed ({type(exc).__name__}: {exc})")
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(x)

    cases = {key: (lambda inp, m=m: m.combine(inp, routing)) for key, m in layers.items()}
    res_f = measure({key: fwd_case(fn, x) for key, fn in cases.items()}, reps, dev, guard=dev.type == "cpu")
    res_b = measure({key: fwd_bwd_case(fn, xg, g) for key, fn in cases.items()}, reps, dev, guard=dev.type == "cpu")
    ref = ("loop", "torch")
    where = f"GPU {torch.cuda.get_device_name()}" if dev.type == "cuda" else "CPU"
    print(f"\n{where} dispatch plans, {label}, {dtype}: time relative to loop/torch, max |diff| vs loop")
    for key in layers:
        name = "/".join(key)
        diff = float((outs[key] - outs[ref]).abs().max())
        print(f"  {name:<16} fwd {res_f[key] * 1e3:8.3f} ms {res_f[key] / res_f[ref]:5.2f}x | f+b {res_b[key] * 1e3:8.3f} ms {res_b[key] / res_b[ref]:5.2f}x | max diff {diff:.2e}")
        emit(f"plans {dev.type} {label}", f"fwd_{name}_over_loop", res_f[key] / res_f[ref], "x")
        emit(f"plans {dev.type} {label}", f"fwd+bwd_{name}_over_loop", res_b[key] / res_b[ref], "x")
        emit(f"plans {dev.type} {label}", f"max_abs_diff_{name}", diff, "abs")
    auto = MoELayer(
        d_model=d, num_experts=e, router=builder("router", "linear_topk", k=k), expert=builder("expert", "swiglu", d_ff=f),
        backend="auto",
    ).to(dev, dtype)
    with torch.no_grad():
        auto.combine(x, routing)
    print(f"  dispatch=auto picked: {auto.last_plan}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced sizes and repetitions (< 1 minute), same code paths")
    ap.add_argument("--json", metavar="FILE", help="also write JSON lines here")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (median reported)")
    args = ap.parse_args()
    report = Report(BENCH, args.quick)
    emit = report.emit

    reps = args.reps or (3 if args.quick else 7)
    fine_t, coarse_t, sweep_t = (2048, 1024, 2048) if args.quick else (16384, 4096, 8192)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu, float32; fixed top-k routing (router excluded); medians of {reps}")
    hdr = ("point", "dense", "moe", "hf", "moe/dn", "hf/moe", "dense", "moe", "hf", "moe/dn", "hf/moe")
    print("{:<34} | {:>8} {:>8} {:>8} {:>6} {:>6} | {:>8} {:>8} {:>8} {:>6} {:>6}".format(*hdr))
    print("{:<34} | {:^44} | {:^44}".format("", "forward (ms)", "forward+backward (ms)"))
    point(f"fine d=1024 E=32 f=128 k=2 T={fine_t}", 1024, 32, 128, 2, fine_t, reps, emit)
    point(f"coarse d=512 E=8 f=2048 k=2 T={coarse_t}", 512, 8, 2048, 2, coarse_t, reps, emit)
    null_sweep(1024, 32, 128, 2, sweep_t, reps, emit)
    plan_table(f"fine T={fine_t}", 1024, 32, 128, 2, fine_t, reps, emit, torch.device("cpu"), torch.float32)
    if torch.cuda.is_available():
        for label, d, e, f, t in (("fine", 1024, 32, 128, fine_t), ("coarse", 512, 8, 2048, coarse_t)):
            plan_table(label, d, e, f, 2, t, max(reps, 10), emit, torch.device("cuda"), torch.bfloat16)
    else:
        print("\nno CUDA device: GPU section (dispatch plans, xformers vs torch) skipped")
    print(f"\nclean repetitions (no other CPU use): {GUARD_STATS['clean']}/{GUARD_STATS['reps']}")
    emit("all", "clean_repetitions_share", GUARD_STATS["clean"] / max(GUARD_STATS["reps"], 1), "fraction")
    print("\ntargets: fwd+bwd moe/dense <= 1.3x (fine), <= 1.1x (coarse); hf_loop/moe >= 2x (fine)")
    report.write(args.json)


if __name__ == "__main__":
    main()
