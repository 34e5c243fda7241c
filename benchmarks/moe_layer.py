"""MoE layer speed and memory against its limits and against transformers' own MoE experts, side by side.

Compared at each point (float32, same weights, same tokens, same fixed routing; the router is not timed):
  - ``moe``: audiomoe's MoE layer (grouped SwiGLU experts, the dispatcher's ``auto`` plan) via ``layer.combine``;
  - ``dense``: a SwiGLU FFN of hidden ``k * d_ff`` on every token = exactly the active FLOPs (the limit, 1.0);
  - ``hf_eager`` / ``hf_grouped_mm``: transformers v5's ``MixtralExperts`` (the installed class) with
    ``experts_implementation`` ``"eager"`` and ``"grouped_mm"``, loaded with the same stacked weights;
    outputs are checked equal to audiomoe's before anything is timed.
``moe/dense`` comes from those two cases interleaved, ``hf_best/moe`` from moe and the HF cases
interleaved: a case timed right after transformers' (which allocate and free gigabytes) pays
~40 ms of page faults, whichever it is.
Points: fine-grained d=1024, 32 experts of width 128, top-2, 16k tokens; coarse d=512, 8 experts of
width 2048, top-2, 4k tokens. Memory at the fine point, audiomoe vs the dense layer: the bytes
autograd keeps from forward to backward per layer (saved-tensor hooks, parameters excluded, output
included; the fused path's scratch workspace, per thread and shared by all layers, apart), and the
peak of one fwd+bwd (resident high-water mark in a fresh process, weights frozen so the E/k times
larger MoE weight gradients do not count). Then time vs null share, and every dispatch plan at the fine point. On CUDA the plans are timed
in bf16 at both points (speed vs loop and largest difference).

``--tune FILE`` writes the fastest plan per shape of this run as a plan table (JSON) that
``moe.plan_table`` reads: the layer itself never times anything.

``--quick``: 2k / 1k / 2k tokens (fine / coarse / sweep), 3 repetitions; ``--smoke``: the same parts at the
smallest shapes (fine d=128, 8 experts of width 32; coarse d=64, 4 experts of width 256; 256 / 128 / 256 tokens),
1 repetition, with the output-equality checks against transformers (seconds).

Usage: python benchmarks/moe_layer.py [--quick | --smoke] [--json FILE] [--reps N] [--tune FILE]
"""

from __future__ import annotations

import argparse
import json

import torch

from audiomoe.core.interfaces import Routing
from audiomoe.moe.dispatcher import GATHER_LIMIT, PLANS, plan_key

from _common import GUARD_STATS, Report, add_mode_flags, builder, fwd_bwd_case, fwd_case, measure, mode_of
from _moe_floor import floors
from _moe_profile import breakdown

BENCH = "moe_layer"
#: (d_model, experts, expert width, k, tokens) of the fine and coarse points and the null sweep's tokens, per run size
SHAPES = {
    "full": ((1024, 32, 128, 2, 16384), (512, 8, 2048, 2, 4096), 8192),
    "quick": ((1024, 32, 128, 2, 2048), (512, 8, 2048, 2, 1024), 2048),
    "smoke": ((128, 8, 32, 2, 256), (64, 4, 256, 2, 128), 256),
}


def moe_layer(d: int, e: int, f: int, k: int, num_null: int = 0, dispatch: str = "auto"):
    """An audiomoe MoE layer built through the registry (grouped SwiGLU experts)."""
    spec = {"num_experts": e, "num_null": num_null, "router": {"name": "top_k", "params": {"k": k}},
            "expert": {"name": "swiglu", "params": {"d_ff": f}}, "dispatch": dispatch}  # fmt: skip
    return builder("moe", "moe", **spec)(d_model=d)


def fixed_topk_routing(x: torch.Tensor, num_columns: int, k: int) -> Routing:
    """A linear top-k gate computed once (no grad): Mixtral-style renormalised weights."""
    gate = torch.randn(x.shape[1], num_columns) / x.shape[1] ** 0.5
    logits = x @ gate
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(k, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_i, True)
    return Routing(logits, mask, weights, top_i, mask.sum(0))


def hf_experts(layer, impl: str) -> torch.nn.Module:
    """transformers' MixtralExperts with ``impl`` and the layer's own weights (state dicts map one to one)."""
    import transformers  # here, not at the top: the peak-memory child processes never need it
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    ex = layer.experts
    cfg = transformers.MixtralConfig(
        hidden_size=ex.d_model, intermediate_size=ex.d_ff, num_local_experts=len(ex), hidden_act="silu"
    )
    cfg._experts_implementation = impl
    hf = MixtralExperts(cfg)
    hf.load_state_dict({k: v.detach().clone() for k, v in ex.state_dict().items()}, strict=True)
    return hf


def saved_bytes(fn, x: torch.Tensor, params) -> int:
    """Bytes kept for backward by ``fn(x)``: unique storages saved by autograd, parameters excluded.

    What stays alive between a layer's forward and its backward, so what a deep stack's peak grows
    by per layer (the fused node's scratch buffers are per thread and reused by every layer: reported
    apart as the workspace).
    """
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    seen.setdefault(-1, y.untyped_storage().nbytes())  # the output itself lives until the next layer
    return sum(seen.values())


def peak_child(name: str, shape: tuple[int, int, int, int], t: int) -> None:
    """In a fresh process: the resident-memory high-water mark added by one fwd+bwd of ``name`` (printed in bytes).

    Weights are frozen (so only activations, the input gradient and scratch count, not the E/k
    times larger MoE weight gradients); everything the step needs is built before the mark is read.
    """

    def hwm() -> int:  # VmHWM is this process's own mm: ru_maxrss would inherit the parent's peak across exec
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) * 1024

    d, e, f, k = shape
    torch.manual_seed(0)
    layer = moe_layer(d, e, f, k) if name == "moe" else builder("expert", "swiglu", d_ff=k * f)(d_model=d)
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(t, d)
    routing = fixed_topk_routing(x, e, k)
    xg, g = x.clone().requires_grad_(True), torch.randn(t, d)
    fn = (lambda inp: layer.combine(inp, routing)) if name == "moe" else layer
    before = hwm()
    fn(xg).backward(g)
    print(hwm() - before)


def peak_rss(name: str, shape: tuple[int, int, int, int], t: int) -> int:
    """:func:`peak_child` in a subprocess (a process's high-water mark never goes down)."""
    import subprocess
    import sys

    shape_arg = ",".join(map(str, shape))
    cmd = [sys.executable, __file__, "--peak-child", name, "--peak-shape", shape_arg, "--peak-tokens", str(t)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def workspace_bytes() -> int:
    """Bytes of the fused dispatch's per-thread scratch buffers (grow-only, shared by every layer)."""
    from audiomoe.moe import fused

    return sum(b.numel() * b.element_size() for b in getattr(fused._LOCAL, "workspace", {}).values())


def point(label: str, d: int, e: int, f: int, k: int, t: int, reps: int, emit, memory: bool = False) -> None:
    """One point: moe vs dense vs transformers' experts (fwd, fwd+bwd; outputs checked equal first); ``memory``: the fine point's extras."""
    torch.manual_seed(0)
    layer = moe_layer(d, e, f, k)
    dense = builder("expert", "swiglu", d_ff=k * f)(d_model=d)
    x = torch.randn(t, d)
    routing = fixed_topk_routing(x, e, k)
    top_w = routing.weights.gather(-1, routing.indices)
    impls = {"moe": lambda inp: layer.combine(inp, routing), "dense": dense}
    for impl in ("eager", "grouped_mm"):
        hf = hf_experts(layer, impl)
        impls[f"hf_{impl}"] = lambda inp, hf=hf: hf(inp, routing.indices, top_w)
    with torch.no_grad():
        ref = impls["moe"](x)
        for name in ("hf_eager", "hf_grouped_mm"):
            diff = float((impls[name](x) - ref).abs().max())
            emit(label, f"max_abs_diff_{name}", diff, "abs")
            assert diff < 1e-3, f"{name} differs from audiomoe by {diff}: not the same computation"
    xg = x.clone().requires_grad_(True)
    g = torch.randn(t, d)
    # two interleaved groups: transformers' cases allocate and free gigabytes per call, and the
    # case timed right after them pays the page faults (measured: +40 ms on whichever follows), so
    # the moe/dense ratio is taken between those two only, the HF ratio against moe in its own group
    res_f, res_b = {}, {}
    for group in (("dense", "moe"), ("moe", "hf_eager", "hf_grouped_mm")):
        rf = measure({n: fwd_case(impls[n], x) for n in group}, reps, guard=True)
        b = measure({n: fwd_bwd_case(impls[n], xg, g) for n in group}, reps, guard=True)
        if memory and "dense" in group:  # as a training step after optimizer.zero_grad(): weight grads None (own group)
            cases = {n: fresh_grads(fwd_bwd_case(impls[n], xg, g), m) for n, m in (("dense", dense), ("moe", layer))}
            fresh = measure(cases, reps, guard=True)
        if "dense" in group:
            res_f.update(rf)
            res_b.update(b)
        else:
            res_f.update({f"{n}@hf": v for n, v in rf.items()} | {n: v for n, v in rf.items() if n != "moe"})
            res_b.update({f"{n}@hf": v for n, v in b.items()} | {n: v for n, v in b.items() if n != "moe"})
    print(f"\n{label}   (plan {layer.last_plan}; transformers' outputs equal audiomoe's)")
    print(
        f"{'':>9} {'dense':>8} {'moe':>8} {'hf_eager':>9} {'hf_grp':>8} | {'moe/dense':>9} {'hf_best/moe':>11}  (each ratio from its own interleaved group)"
    )
    for phase, res in (("fwd", res_f), ("fwd+bwd", res_b)):
        for name, sec in res.items():
            emit(label, f"{phase}_{name}_ms", sec * 1e3, "ms")
        best = min(res["hf_eager"], res["hf_grouped_mm"])
        emit(label, f"{phase}_moe_over_dense", res["moe"] / res["dense"], "x")
        emit(label, f"{phase}_hf_best_over_moe", best / res["moe@hf"], "x")
        ms = [res[n] * 1e3 for n in ("dense", "moe", "hf_eager", "hf_grouped_mm")]
        print(
            f"{phase:>9} {ms[0]:8.1f} {ms[1]:8.1f} {ms[2]:9.1f} {ms[3]:8.1f} | {res['moe'] / res['dense']:8.2f}x {best / res['moe@hf']:10.2f}x"
        )
    if memory:
        emit(label, "fwd+bwd_fresh_grads_moe_over_dense", fresh["moe"] / fresh["dense"], "x")
        print(f"{'fwd+bwd':>9} {fresh['dense'] * 1e3:8.1f} {fresh['moe'] * 1e3:8.1f} {'':>18} | {fresh['moe'] / fresh['dense']:8.2f}x  "
              "(weight grads set to None before each, as optimizer.zero_grad() leaves them; above: accumulated)")  # fmt: skip
        breakdown(label, impls, xg, g, emit)
        floors(label, x, routing, (e, f, k), res_b["dense"], reps, emit)
        params = [*layer.parameters(), *dense.parameters()]
        saved = {name: saved_bytes(impls[name], xg, params) for name in ("moe", "dense")}
        for name, b in saved.items():
            emit(label, f"saved_for_backward_mb_{name}", b / 2**20, "MB")
        emit(label, "saved_for_backward_moe_over_dense", saved["moe"] / saved["dense"], "x")
        emit(label, "fused_workspace_mb", workspace_bytes() / 2**20, "MB")
        print(f"{'saved MB':>9} {saved['dense'] / 2**20:8.1f} {saved['moe'] / 2**20:8.1f} {'':>18} | {saved['moe'] / saved['dense']:8.2f}x  "
              f"(kept for backward per layer; + {workspace_bytes() / 2**20:.0f} MB fused scratch shared by all layers)")  # fmt: skip
        peak = {name: peak_rss(name, (d, e, f, k), t) for name in ("moe", "dense")}
        for name, b in peak.items():
            emit(label, f"fwd+bwd_peak_rss_mb_{name}", b / 2**20, "MB")
        emit(label, "fwd+bwd_peak_rss_moe_over_dense", peak["moe"] / max(peak["dense"], 1), "x")
        print(f"{'peak MB':>9} {peak['dense'] / 2**20:8.1f} {peak['moe'] / 2**20:8.1f} {'':>18} | {peak['moe'] / max(peak['dense'], 1):8.2f}x  "
              "(fwd+bwd resident high-water mark in a fresh process, weights frozen, scratch included)")  # fmt: skip


def fresh_grads(run, module: torch.nn.Module):
    """``run`` with the module's parameter gradients set to None first (a training step after ``zero_grad()``)."""

    def step() -> None:
        for p in module.parameters():
            p.grad = None
        run()

    return step


def null_sweep(d: int, e: int, f: int, k: int, t: int, reps: int, emit, shares=(0.0, 0.25, 0.5, 0.75, 1.0)) -> None:
    """Time vs the share of picks that go to null columns (4 null columns)."""
    torch.manual_seed(0)
    n_null = 4
    layer = moe_layer(d, e, f, k, num_null=n_null)
    x = torch.randn(t, d)
    logits = fixed_topk_routing(x, e + n_null, k).logits
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(t, k, generator=gen)
    top_i = logits[:, :e].topk(k, -1).indices
    null_i = e + torch.randint(0, n_null, (t, k), generator=gen)
    xg, g = x.clone().requires_grad_(True), torch.randn(t, d)
    routings = {}
    for share in shares:
        idx = torch.where(u < share, null_i, top_i)
        mask = torch.zeros(t, e + n_null, dtype=torch.bool).scatter(-1, idx, True)
        routings[share] = Routing(logits, mask, mask.float() / mask.sum(-1, keepdim=True), idx, mask.sum(0))
    cases = {s: (lambda inp, r=r: layer.combine(inp, r)) for s, r in routings.items()}
    res_f = measure({s: fwd_case(fn, x) for s, fn in cases.items()}, reps, guard=True)
    res_b = measure({s: fwd_bwd_case(fn, xg, g) for s, fn in cases.items()}, reps, guard=True)
    case = f"null_sweep d={d} E={e} f={f} k={k} T={t}"
    print(f"\n{case}  (time relative to no null picks)")
    print(f"{'null share':>10} {'real pairs':>10} {'fwd ms':>8} {'rel':>6} {'f+b ms':>8} {'rel':>6}")
    for s, r in routings.items():
        emit(case, f"fwd_rel@null={s}", res_f[s] / res_f[shares[0]], "x")
        emit(case, f"fwd+bwd_rel@null={s}", res_b[s] / res_b[shares[0]], "x")
        real = int(r.mask[:, :e].sum())
        print(
            f"{s:>10.2f} {real:>10} {res_f[s] * 1e3:>8.1f} {res_f[s] / res_f[shares[0]]:>5.2f}x {res_b[s] * 1e3:>8.1f} {res_b[s] / res_b[shares[0]]:>5.2f}x"
        )


def plans(
    label: str,
    d: int,
    e: int,
    f: int,
    k: int,
    t: int,
    reps: int,
    emit,
    dev: torch.device,
    dtype: torch.dtype,
    table: dict,
) -> None:
    """Every dispatch plan side by side: time relative to ``loop``, largest difference from it; best into ``table``."""
    torch.manual_seed(0)
    x = torch.randn(t, d, device=dev, dtype=dtype)
    r = fixed_topk_routing(x.float().cpu(), e, k)
    routing = Routing(*(v.to(dev) for v in (r.logits, r.mask, r.weights.to(dtype), r.indices, r.counts)))
    layers, outs = {}, {}
    for plan in ("loop", *[p for p in PLANS if p != "loop"]):
        if (
            plan == "gathered" and t * k * 3 * d * f > 64 * GATHER_LIMIT
        ):  # copies every pair's weights: a decoding-step plan
            print(
                f"  gathered: skipped ({t * k} pairs would gather {t * k * 3 * d * f * x.element_size() / 2**30:.0f} GiB of weights)"
            )
            continue
        if (
            plan == "dense" and t * e * 3 * d * f > 64 * GATHER_LIMIT
        ):  # every expert on every token: a decoding-step plan
            print(f"  dense: skipped (every expert on every token is {e // k}x the routed compute)")
            continue
        torch.manual_seed(0)
        layer = moe_layer(d, e, f, k, dispatch=plan).to(dev, dtype)
        try:
            with torch.no_grad():
                outs[plan] = layer.combine(x, routing).float()
            layers[plan] = layer
        except Exception as exc:  # noqa: BLE001 - report a plan this machine cannot run, keep the others
            print(f"  {plan}: failed ({type(exc).__name__}: {exc})")
    xg, g = x.clone().requires_grad_(True), torch.randn_like(x)
    cases = {p: (lambda inp, m=m: m.combine(inp, routing)) for p, m in layers.items()}
    res_f = measure({p: fwd_case(fn, x) for p, fn in cases.items()}, reps, dev, guard=dev.type == "cpu")
    res_b = measure({p: fwd_bwd_case(fn, xg, g) for p, fn in cases.items()}, reps, dev, guard=dev.type == "cpu")
    where = f"GPU {torch.cuda.get_device_name()}" if dev.type == "cuda" else "CPU"
    print(f"\n{where} dispatch plans, {label}, {dtype}: time relative to loop, max |diff| vs loop")
    for p in layers:
        diff = float((outs[p] - outs["loop"]).abs().max())
        print(
            f"  {p:<11} fwd {res_f[p] * 1e3:8.3f} ms {res_f[p] / res_f['loop']:5.2f}x | f+b {res_b[p] * 1e3:8.3f} ms {res_b[p] / res_b['loop']:5.2f}x | max diff {diff:.2e}"
        )
        emit(f"plans {dev.type} {label}", f"fwd+bwd_{p}_over_loop", res_b[p] / res_b["loop"], "x")
        emit(f"plans {dev.type} {label}", f"max_abs_diff_{p}", diff, "abs")
    best = min(res_b, key=res_b.__getitem__)
    table[plan_key(dev, dtype, layers[best].experts)] = best
    auto = moe_layer(d, e, f, k).to(dev, dtype)
    print(f"  fastest fwd+bwd: {best}; dispatch=auto (no table) runs: {auto.dispatcher.plan_for(auto.experts, x)}")


def main() -> None:
    """Run every part at the sizes of the chosen mode; print the tables, write JSON lines (and a plan table with --tune)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mode_flags(ap, "reduced sizes and repetitions (< 1 minute), same code paths")
    ap.add_argument("--json", metavar="FILE", help="also write JSON lines here")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (median reported)")
    ap.add_argument("--tune", metavar="FILE", help="write the fastest plan per shape as a plan table (moe.plan_table)")
    ap.add_argument("--peak-child", choices=("moe", "dense"), help=argparse.SUPPRESS)
    ap.add_argument("--peak-shape", default="1024,32,128,2", help=argparse.SUPPRESS)
    ap.add_argument("--peak-tokens", type=int, default=16384, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        d, e, f, k = (int(v) for v in args.peak_shape.split(","))
        return peak_child(args.peak_child, (d, e, f, k), args.peak_tokens)
    import transformers

    mode = mode_of(args)
    report = Report(BENCH, mode)
    emit = report.emit
    reps = args.reps or {"full": 7, "quick": 3, "smoke": 1}[mode]
    fine, coarse, sweep_t = SHAPES[mode]
    fd, fe, ff, fk, fine_t = fine
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, cpu, float32; "
          f"fixed top-k routing (router excluded); medians of {reps}")  # fmt: skip
    for name, (d, e, f, k, t) in (("fine", fine), ("coarse", coarse)):
        point(f"{name} d={d} E={e} f={f} k={k} T={t}", d, e, f, k, t, reps, emit, memory=name == "fine")
    null_sweep(fd, fe, ff, fk, sweep_t, reps, emit)
    table: dict[str, str] = {}
    plans(f"fine T={fine_t}", fd, fe, ff, fk, fine_t, reps, emit, torch.device("cpu"), torch.float32, table)
    if torch.cuda.is_available():
        for label, (d, e, f, k, t) in (("fine", fine), ("coarse", coarse)):
            plans(label, d, e, f, k, t, max(reps, 10), emit, torch.device("cuda"), torch.bfloat16, table)
    else:
        print("\nno CUDA device: GPU section (grouped_mm vs xformers vs loop in bf16) skipped")
    if args.tune:
        with open(args.tune, "w", encoding="utf-8") as fh:
            json.dump(table, fh, indent=2)
        print(f"\nplan table ({len(table)} shapes) written to {args.tune}: set moe.plan_table to use it")
    print(f"\nclean repetitions (no other CPU use): {GUARD_STATS['clean']}/{GUARD_STATS['reps']}")
    emit("all", "clean_repetitions_share", GUARD_STATS["clean"] / max(GUARD_STATS["reps"], 1), "fraction")
    print(
        "\ntargets (fwd+bwd): moe/dense <= 1.15x (fine), <= 1.05x (coarse); hf_best/moe >= 2x (fine); saved-for-backward moe/dense <= 1.25x (fine)"
    )
    report.write(args.json)


if __name__ == "__main__":
    main()
