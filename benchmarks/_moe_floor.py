"""Where the fine point's moe/dense goes: the row traffic and the GEMM shapes of a gather-then-GEMM MoE, timed alone.

Two parts, each timed alone as the fused path (``audiomoe/moe/fused.py``) runs it, against the
dense SwiGLU of the same active FLOPs (the ``moe/dense`` bar of ``benchmarks/moe_layer.py``):

- **row traffic**: 3 gathers (x forward, dL/dy and x again backward) and 2 zero + scatter-add
  passes (y, dL/dx) of every pair's D-wide row, in blocks of ``BLOCK_BYTES``;
- **GEMM shapes**: the same FLOPs as per-expert GEMMs (M = one expert's pairs, N or K = the
  expert width) instead of the dense layer's six large GEMMs, both into warm preallocated outputs
  (no page faults on either side), so only the shapes differ. Fine-grained experts run
  narrower, shorter GEMMs (K = F in the down projection, and twice the rows of output per FLOP).

Each part is timed alone; they do not add up to a bound (the fused path's warm scratch spares it
page faults that the dense layer's fresh intermediates pay), but together they show what a target
leaves for the rows: a gather fused into the GEMM's packing (a custom kernel) would remove the first.
"""

from __future__ import annotations

import torch

from audiomoe.core.interfaces import Routing
from audiomoe.moe.dispatcher import sorted_pairs
from audiomoe.moe.fused import BLOCK_BYTES

from _common import measure


def _row_traffic_cases(x: torch.Tensor, tok: torch.Tensor) -> dict:
    rows = BLOCK_BYTES // (x.shape[1] * x.element_size())
    chunks = list(tok.split(rows))
    buf = x.new_empty(rows, x.shape[1])
    out = torch.zeros_like(x)

    def gather() -> None:
        for idx in chunks:
            torch.index_select(x, 0, idx, out=buf[: idx.numel()])

    def scatter() -> None:
        # zeroed then added into, as the fused path's output (forward) and input gradient (backward); a warm
        # buffer: the page faults of a fresh output the dense layer pays too (its GEMM writes one)
        out.zero_()
        for idx in chunks:
            out.index_add_(0, idx, buf[: idx.numel()])

    return {"gather": gather, "scatter": scatter}


def _gemm_cases(n: int, d: int, f: int, k: int, counts: list[int]) -> dict:
    """The six GEMMs of a SwiGLU fwd+bwd: dense (hidden k*f, n rows) and per expert (hidden f, its rows)."""
    h, s = k * f, sum(counts)
    dn = {"x": torch.randn(n, d), "wgu": torch.randn(2 * h, d), "wd": torch.randn(d, h), "a": torch.randn(n, h),
          "g": torch.randn(n, 2 * h), "H": torch.empty(n, 2 * h), "Y": torch.empty(n, d), "dA": torch.empty(n, h),
          "dWd": torch.empty(d, h), "dWgu": torch.empty(2 * h, d)}  # fmt: skip
    gu, down = torch.randn(len(counts), 2 * f, d), torch.randn(len(counts), d, f)
    hs, bmax = torch.randn(s, 2 * f), max(counts)
    # as the fused path runs them: every D-wide operand is the one cache-resident block of rows
    rows, a, da, g = torch.randn(bmax, d), torch.randn(bmax, f), torch.empty(bmax, f), torch.randn(bmax, 2 * f)
    dgu, ddown, ddown_t = torch.empty_like(gu), torch.empty_like(down), torch.empty(f, d)
    bounds, start = [], 0
    for e, c in enumerate(counts):
        if c:
            bounds.append((e, c, slice(start, start + c)))
            start += c

    def dense() -> None:
        torch.mm(dn["x"], dn["wgu"].t(), out=dn["H"])
        torch.mm(dn["a"], dn["wd"].t(), out=dn["Y"])
        torch.mm(dn["Y"], dn["wd"], out=dn["dA"])
        torch.mm(dn["Y"].t(), dn["a"], out=dn["dWd"])
        torch.mm(dn["g"], dn["wgu"], out=dn["Y"])
        torch.mm(dn["g"].t(), dn["x"], out=dn["dWgu"])

    def experts() -> None:
        for e, c, r in bounds:
            torch.mm(rows[:c], gu[e].t(), out=hs[r])
            torch.mm(a[:c], down[e].t(), out=rows[:c])
        for e, c, _ in bounds:
            torch.mm(rows[:c], down[e], out=da[:c])
            torch.mm(a[:c].t(), rows[:c], out=ddown_t)  # the fused path's narrow-expert dW_down product
            ddown[e].copy_(ddown_t.t())
            torch.mm(g[:c], gu[e], out=rows[:c])
            torch.mm(g[:c].t(), rows[:c], out=dgu[e])

    return {"gemm_dense": dense, "gemm_experts": experts}


def floors(
    label: str, x: torch.Tensor, routing: Routing, shape: tuple[int, int, int], dense_s: float, reps: int, emit
) -> None:
    """Print and emit the row-traffic and GEMM-shape parts of the fine point's moe/dense (``shape`` = experts, width, k)."""
    num_experts, f, k = shape
    _, tok, counts = sorted_pairs(routing.mask, num_experts)
    cases = _row_traffic_cases(x, tok) | _gemm_cases(x.shape[0], x.shape[1], f, k, counts.tolist())
    t = measure(cases, reps, guard=True)
    traffic = (3 * t["gather"] + 2 * t["scatter"]) / dense_s
    shapes = (t["gemm_experts"] - t["gemm_dense"]) / dense_s
    emit(label, "row_traffic_ms", (3 * t["gather"] + 2 * t["scatter"]) * 1e3, "ms")
    emit(label, "row_traffic_floor_moe_over_dense", 1 + traffic, "x")
    emit(label, "gemm_dense_ms", t["gemm_dense"] * 1e3, "ms")
    emit(label, "gemm_experts_ms", t["gemm_experts"] * 1e3, "ms")
    emit(label, "gemm_shapes_moe_over_dense", t["gemm_experts"] / t["gemm_dense"], "x")
    print(f"{'row traffic':>36} gather pass {t['gather'] * 1e3:.1f} ms, zero + scatter pass {t['scatter'] * 1e3:.1f} ms: "
          f"3 + 2 of them = {traffic:.0%} of dense fwd+bwd")  # fmt: skip
    print(f"{'GEMM shapes':>36} the six fwd+bwd GEMMs into warm outputs: dense {t['gemm_dense'] * 1e3:.1f} ms, "
          f"per expert {t['gemm_experts'] * 1e3:.1f} ms ({t['gemm_experts'] / t['gemm_dense']:.2f}x; {shapes:+.0%} of dense fwd+bwd)")  # fmt: skip
    print(f"{'':>36} each part timed alone; they do not simply add up (the fused path's warm scratch spares it the")
    print(
        f"{'':>36} page faults the dense layer's fresh intermediates pay), but 1.15x leaves {0.15 - shapes:.0%} of dense for all the rows"
    )
