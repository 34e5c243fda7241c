"""The fused CPU path of the dispatcher: gather, every SwiGLU expert, weighting and scatter in one node.

``out = base + sum_p w_p * SwiGLU_{e_p}(tokens[tok_p])`` for (expert, token) pairs sorted by expert,
over the stacked weights of :class:`audiomoe.experts.grouped.GroupedSwiGLU` (``gate_up`` [E, 2F, D],
``down`` [E, D, F]): one GEMM per expert on its contiguous slice, as MegaBlocks' dropless MoE
(Gale et al. 2023) does with block-sparse kernels. Memory: forward saves only the pre-activations
``H`` [S, 2F], the pair weights and the indices; the gathered rows [S, D] are gathered again in
backward (one warm copy) instead of stored, and every [S, D] / [S, F] temporary of both passes lives
in per-thread scratch buffers that are reused (a fresh 128 MB gather is page-faulted at ~0.35 ms/MB
here; a warm one costs a fifth). The pair weight scales the F-wide activation before the down
projection (linear, so the same result at F/D of the traffic).
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

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


def _mm(a: torch.Tensor, w: torch.Tensor, bounds, out: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """``out[s:t] = a[s:t] @ w[e]^T`` (or ``@ w[e]``) per expert slice, in place; returns ``out``."""
    for e, s, t in bounds:
        torch.mm(a[s:t], w[e].t() if transpose else w[e], out=out[s:t])
    return out


def _weight_grad(left: torch.Tensor, right: torch.Tensor, like: torch.Tensor, bounds) -> torch.Tensor:
    """Stacked gradient ``g[e] = left[s:t]^T @ right[s:t]`` (zero for experts with no rows)."""
    g = torch.zeros_like(like)
    for e, s, t in bounds:
        torch.mm(left[s:t].t(), right[s:t], out=g[e])
    return g


def _swiglu_input_grad(d_act: torch.Tensor, h: torch.Tensor, silu: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """dL/dH [S, 2F] from dL/dact for ``act = silu(g) * u``: up half ``d_act * silu(g)``, gate half ``silu'(g) * d_act * u``."""
    f = silu.shape[1]
    torch.mul(d_act, silu, out=out[:, f:])
    torch.ops.aten.silu_backward.grad_input(torch.mul(d_act, h[:, f:], out=tmp), h[:, :f], grad_input=out[:, :f])
    return out


class FusedSwiGLUMoE(torch.autograd.Function):
    """One autograd node for the expert part of a layer (see the module docstring). ``base`` may be None (zeros)."""

    @staticmethod
    def forward(ctx, tokens, base, tok, w, counts, gate_up, down):  # type: ignore[override]
        f = gate_up.shape[1] // 2
        s_total, d = tok.numel(), tokens.shape[1]
        bounds = bounds_of(counts)
        rows = torch.index_select(tokens, 0, tok, out=_scratch("rows", s_total, d, tokens))
        h = _mm(rows, gate_up, bounds, tokens.new_empty(s_total, 2 * f))
        act = _scratch("act", s_total, f, tokens)
        torch.ops.aten.silu.out(h[:, :f], out=act)
        act.mul_(h[:, f:]).mul_(w.to(act.dtype).unsqueeze(-1))
        _mm(act, down, bounds, rows)  # the gathered rows are dead: the expert outputs reuse their buffer
        out = tokens.new_zeros(tokens.shape) if base is None else base.clone()
        out.index_add_(0, tok, rows)
        ctx.save_for_backward(tokens, h, w, tok, gate_up, down)
        ctx.bounds, ctx.f, ctx.has_base = bounds, f, base is not None
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        tokens, h, w, tok, gate_up, down = ctx.saved_tensors
        f, bounds = ctx.f, ctx.bounds
        s_total, d = tok.numel(), tokens.shape[1]
        # one [S, D] buffer serves dy, then dxs, then the re-gathered xs
        rows = torch.index_select(dout.contiguous(), 0, tok, out=_scratch("rows", s_total, d, h))
        silu = torch.ops.aten.silu.out(h[:, :f], out=_scratch("silu", s_total, f, h))
        act = torch.mul(silu, h[:, f:], out=_scratch("act", s_total, f, h))
        d_act = _mm(rows, down, bounds, _scratch("d_act", s_total, f, h), transpose=False)
        tmp = _scratch("tmp", s_total, f, h)
        # dL/dw_p = <dL/dact_p, act_p> (w_p scales the activation in forward)
        dw = torch.mul(d_act, act, out=tmp).sum(-1).to(w.dtype) if ctx.needs_input_grad[3] else None
        wc = w.to(act.dtype).unsqueeze(-1)
        need_w = ctx.needs_input_grad[5] or ctx.needs_input_grad[6]
        d_down: Optional[torch.Tensor] = _weight_grad(rows, act.mul_(wc), down, bounds) if need_w else None
        dh = _swiglu_input_grad(d_act.mul_(wc), h, silu, _scratch("dh", s_total, 2 * f, h), tmp)
        dtokens = None
        if ctx.needs_input_grad[0]:
            dtokens = dout.new_zeros(tokens.shape).index_add_(0, tok, _mm(dh, gate_up, bounds, rows, transpose=False))
        d_gate_up = None
        if need_w:
            d_gate_up = _weight_grad(dh, torch.index_select(tokens, 0, tok, out=rows), gate_up, bounds)
        dbase = dout if ctx.has_base and ctx.needs_input_grad[1] else None
        return (dtokens, dbase, None, dw, None, d_gate_up, d_down)
