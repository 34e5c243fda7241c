"""The fused CPU path of the dispatcher: gather, every SwiGLU expert, weighting and scatter in one node.

``out = base + sum_p w_p * SwiGLU_{e_p}(tokens[tok_p])`` for (expert, token) pairs sorted by expert,
over the stacked weights of :class:`audiomoe.moe.grouped.GroupedSwiGLU` (``gate_up`` [E, 2F, D],
``down`` [E, D, F]): one GEMM per expert on its contiguous slice, as MegaBlocks' dropless MoE
(Gale et al. 2023) does with block-sparse kernels. Memory: forward saves only the pre-activations
``H`` [S, 2F], the pair weights and the indices. Both passes stream over blocks of consecutive
experts through one buffer of about ``BLOCK_BYTES`` of rows, so no [S, D] tensor of all pairs
exists at any time (the dense layer's peak is the bar); the buffers are per-thread scratch reused
across calls (a fresh large buffer is page-faulted at ~0.2-0.35 ms/MB here; a warm one costs a
fifth). The pair weight scales the F-wide activation before the down projection (linear, so the
same result at F/D of the traffic).

What remains above the dense layer at a fine-grained point is memory traffic no GEMM hides: the
rows gathered three times (x forward, dL/dy and x again backward) and scattered twice (y, dL/dx),
and the E/k times larger weight gradients (see ``benchmarks/moe_layer.py``).
"""

from __future__ import annotations

import threading
from typing import Sequence

import torch

_LOCAL = threading.local()


def _scratch(name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A reusable [rows, cols] scratch tensor on CPU (fresh elsewhere or when small), one grow-only buffer per name.

    Scratch never escapes the autograd node that asks for it and is per thread, so reuse is safe.
    """
    n = rows * cols
    if like.device.type != "cpu" or n < (1 << 18):
        return like.new_empty(rows, cols)
    ws = getattr(_LOCAL, "workspace", None)
    if ws is None:
        ws = _LOCAL.workspace = {}
    key = (name, like.dtype)
    buf = ws.get(key)
    if buf is None or buf.numel() < n:
        buf = ws[key] = like.new_empty(n)
    return buf[:n].view(rows, cols)


def release_workspace() -> None:
    """Free the CPU scratch buffers that the fused dispatch keeps between calls (this thread's)."""
    getattr(_LOCAL, "workspace", {}).clear()


def bounds_of(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(expert, start, stop)`` of each non-empty expert slice of expert-sorted rows."""
    out, s = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, s, s + c))
            s += c
    return out


def _swiglu_input_grad(
    d_act: torch.Tensor, h: torch.Tensor, silu: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor
) -> torch.Tensor:
    """dL/dH [S, 2F] from dL/dact for ``act = silu(g) * u``: up half ``d_act * silu(g)``, gate half ``silu'(g) * d_act * u``."""
    f = silu.shape[1]
    torch.mul(d_act, silu, out=out[:, f:])
    torch.ops.aten.silu_backward.grad_input(torch.mul(d_act, h[:, f:], out=tmp), h[:, :f], grad_input=out[:, :f])
    return out


#: Pairs are processed in blocks of consecutive experts of about this many bytes of gathered rows:
#: small enough that a block's gathered rows stay in cache between the gather, its GEMMs and the
#: scatter (no [S, D] buffer of all pairs exists, and the gather costs no extra DRAM round trip).
BLOCK_BYTES = 4 << 20


def blocks_of(
    bounds: list[tuple[int, int, int]], total: int, row_bytes: int = 0
) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Group consecutive expert slices into blocks of about ``BLOCK_BYTES / row_bytes`` rows: ``(start, stop, slices)``.

    ``row_bytes`` 0: four blocks of about ``total / 4`` rows. An expert's slice is never split.
    """
    target = BLOCK_BYTES // row_bytes if row_bytes else -(-total // 4)
    size = max(target, max((t - s for _, s, t in bounds), default=0))
    out: list[tuple[int, int, list[tuple[int, int, int]]]] = []
    for e, s, t in bounds:
        if out and t - out[-1][0] <= size:
            out[-1] = (out[-1][0], t, out[-1][2] + [(e, s, t)])
        else:
            out.append((s, t, [(e, s, t)]))
    return out


def _weight_grad_buffer(weight: torch.Tensor, blocks) -> torch.Tensor:
    """A stacked gradient buffer: every used expert's slice is written by a GEMM, so only idle experts are zeroed."""
    g = torch.empty_like(weight)
    used = {e for _, _, slices in blocks for e, _, _ in slices}
    for e in range(weight.shape[0]):
        if e not in used:
            g[e].zero_()
    return g


class FusedSwiGLUMoE(torch.autograd.Function):
    """One autograd node for the expert part of a layer (see the module docstring). ``base`` may be None (zeros).

    Both passes stream over blocks of consecutive experts (:func:`blocks_of`): each block's rows
    are gathered into one buffer (reused by every block, warm across calls), computed and
    scattered back, so no [S, D] tensor of all pairs ever exists; only ``H`` [S, 2F] is kept.
    """

    @staticmethod
    def forward(ctx, tokens, base, tok, w, counts, gate_up, down):  # type: ignore[override]  # autograd.Function's own signature
        f = gate_up.shape[1] // 2
        d, n_pairs = tokens.shape[1], tok.numel()
        blocks = blocks_of(bounds_of(counts), n_pairs, d * tokens.element_size())
        bmax = max((t - s for s, t, _ in blocks), default=0)
        h = tokens.new_empty(n_pairs, 2 * f)
        rows, act = _scratch("rows", bmax, d, tokens), _scratch("act", bmax, f, tokens)
        out = tokens.new_zeros(tokens.shape) if base is None else base.clone()
        wa = w.to(tokens.dtype).unsqueeze(-1)
        for s0, t0, slices in blocks:
            c, idx = t0 - s0, tok[s0:t0]
            xs = torch.index_select(tokens, 0, idx, out=rows[:c])
            for e, s, t in slices:
                torch.mm(xs[s - s0 : t - s0], gate_up[e].t(), out=h[s:t])
            hb = h[s0:t0]
            a = torch.ops.aten.silu.out(hb[:, :f], out=act[:c]).mul_(hb[:, f:]).mul_(wa[s0:t0])
            for e, s, t in slices:  # the gathered rows are dead: the expert outputs reuse their buffer
                torch.mm(a[s - s0 : t - s0], down[e].t(), out=rows[s - s0 : t - s0])
            out.index_add_(0, idx, rows[:c])
        ctx.save_for_backward(tokens, h, w, tok, gate_up, down)
        ctx.blocks, ctx.f, ctx.bmax, ctx.has_base = blocks, f, bmax, base is not None
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]  # autograd.Function's own signature
        tokens, h, w, tok, gate_up, down = ctx.saved_tensors
        f, blocks, bmax = ctx.f, ctx.blocks, ctx.bmax
        d = tokens.shape[1]
        dout = dout.contiguous()
        need_x, need_w, need_pw = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[5] or ctx.needs_input_grad[6],
            ctx.needs_input_grad[3],
        )
        dtokens = dout.new_zeros(tokens.shape) if need_x else None
        d_gate_up = _weight_grad_buffer(gate_up, blocks) if need_w else None
        d_down = _weight_grad_buffer(down, blocks) if need_w else None
        dw = torch.zeros_like(w) if need_pw else None
        rows = _scratch("rows", bmax, d, h)
        silu, act, d_act, tmp = (_scratch(n, bmax, f, h) for n in ("silu", "act", "d_act", "tmp"))
        dh = _scratch("dh", bmax, 2 * f, h)
        d_down_t = h.new_empty(f, d) if need_w and 2 * f < d else None
        wa = w.to(h.dtype).unsqueeze(-1)
        for s0, t0, slices in blocks:
            c, idx, hb, wb = t0 - s0, tok[s0:t0], h[s0:t0], wa[s0:t0]
            dy = torch.index_select(dout, 0, idx, out=rows[:c])
            si = torch.ops.aten.silu.out(hb[:, :f], out=silu[:c])
            a = torch.mul(si, hb[:, f:], out=act[:c])
            da = d_act[:c]
            for e, s, t in slices:
                torch.mm(dy[s - s0 : t - s0], down[e], out=da[s - s0 : t - s0])
            if need_pw:  # dL/dw_p = <dL/dact_p, act_p> (w_p scales the activation in forward)
                dw[s0:t0] = torch.mul(da, a, out=tmp[:c]).sum(-1).to(w.dtype)
            if need_w:
                a.mul_(wb)
                for e, s, t in slices:
                    if d_down_t is None:
                        torch.mm(dy[s - s0 : t - s0].t(), a[s - s0 : t - s0], out=d_down[e])
                    else:  # narrow experts: (act^T dy)^T, as the [F, D] product is the faster GEMM (measured ~10% at F=D/8)
                        torch.mm(a[s - s0 : t - s0].t(), dy[s - s0 : t - s0], out=d_down_t)
                        d_down[e].copy_(d_down_t.t())
            g = _swiglu_input_grad(da.mul_(wb), hb, si, dh[:c], tmp[:c])
            if need_x:
                for e, s, t in slices:
                    torch.mm(g[s - s0 : t - s0], gate_up[e], out=rows[s - s0 : t - s0])
                dtokens.index_add_(0, idx, rows[:c])
            if need_w:
                xs = torch.index_select(tokens, 0, idx, out=rows[:c])
                for e, s, t in slices:
                    torch.mm(g[s - s0 : t - s0].t(), xs[s - s0 : t - s0], out=d_gate_up[e])
        dbase = dout if ctx.has_base and ctx.needs_input_grad[1] else None
        return (dtokens, dbase, None, dw, None, d_gate_up, d_down)
