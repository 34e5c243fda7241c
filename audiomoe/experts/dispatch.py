"""MoE dispatch maths (plain functions, not components): pair lists, capacity, expert compute.

The layout every function here shares: the (token, expert) pairs of a routing decision, sorted by
expert, so that expert ``e`` owns the contiguous slice ``[starts[e], starts[e] + counts[e])`` of
the gathered rows ``xs``. Reading the dense ``mask`` column-major (``mask.t().nonzero()``) gives
that order directly (token ascending inside each expert), with no argsort.

CPU pitfalls designed around (see ``shared/reference/moe-compute.md`` §4): slicing a tensor or a
weight stack under autograd once per expert materialises a full-size zero gradient per expert, so
the generic path uses ``split`` and the SwiGLU path a custom autograd function that writes each
expert's GEMM into one preallocated buffer with ``torch.mm(out=)`` and has a hand-written backward.
Fresh large CPU allocations are page-faulted on every call, so the fused node keeps its [S, d] and
[S, f] temporaries in per-thread reusable scratch and saves only the f-wide pre-activations.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("audiomoe.experts")


def sorted_pairs(mask: torch.Tensor, num_routed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(expert_idx, token_idx, counts)`` of the selected pairs over the first ``num_routed`` columns.

    Pairs are ordered by expert, then token; ``counts`` [num_routed] is each expert's load. Null
    columns (after ``num_routed``) are never listed: they cost nothing.
    """
    exp, tok = mask[:, :num_routed].t().nonzero(as_tuple=True)
    counts = torch.bincount(exp, minlength=num_routed)
    return exp, tok, counts


def capacity_of(num_selected: int, num_columns: int, capacity_factor: float, min_capacity: int) -> int:
    """Per-expert capacity ``max(min_capacity, ceil(factor * selected pairs / columns))``.

    This is GShard's ``factor * T * k / E`` with the mean load measured, so it also holds for top-p's
    variable k; null columns count in ``num_columns`` (UniMoE-Audio's ``E_dyn``).
    """
    return max(int(min_capacity), math.ceil(capacity_factor * num_selected / max(num_columns, 1)))


def drop_over_capacity(
    exp: torch.Tensor,
    tok: torch.Tensor,
    counts: torch.Tensor,
    capacity: int,
    policy: str = "position",
    scores: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` pairs per expert: ``(exp, tok, counts)`` kept, then ``(exp, tok)`` dropped.

    ``policy="position"`` keeps each expert's first tokens in sequence order (GShard/Switch);
    ``policy="probs"`` keeps the pairs with the largest ``scores`` [S] (router logits, as UniMoE-Audio's
    ``drop_policy="probs"``). Input pairs must be sorted by expert (see :func:`sorted_pairs`); the
    kept pairs stay grouped by expert.
    """
    if policy == "probs":
        if scores is None:
            raise ValueError("drop policy 'probs' needs the pair scores")
        order = torch.argsort(scores, descending=True, stable=True)
        order = order[torch.argsort(exp[order], stable=True)]
        exp, tok = exp[order], tok[order]
    elif policy != "position":
        raise ValueError(f"drop policy {policy!r} is not one of 'position', 'probs'")
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(exp.numel(), device=exp.device) - starts[exp]
    keep = rank < capacity
    if bool(keep.all()):
        return exp, tok, counts, exp[:0], tok[:0]
    return exp[keep], tok[keep], counts.clamp(max=capacity), exp[~keep], tok[~keep]


class SortedSwiGLU(torch.autograd.Function):
    """All SwiGLU experts on expert-sorted rows: ``Y[s:t] = (silu(xs W_g^T) * xs W_u^T) W_d^T`` per slice.

    Inputs: ``xs`` [S, d], ``counts`` (python ints, one per expert), then ``w_in_0, w_out_0, w_in_1,
    ...`` (``w_in`` [2f, d] = gate|up rows, ``w_out`` [d, f]). Saves ``xs`` and the pre-activation
    ``H`` [S, 2f]; the activation is recomputed in backward (elementwise, cheap) instead of stored.
    Experts with no rows get no gradient (``None``), as in a plain loop that never calls them.
    """

    @staticmethod
    def forward(ctx, xs: torch.Tensor, counts: Sequence[int], *weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w_in, w_out = weights[0::2], weights[1::2]
        f = w_in[0].shape[0] // 2
        s_total = xs.shape[0]
        bounds = _bounds(counts)
        h = _expert_mm(xs, w_in, bounds, xs.new_empty(s_total, 2 * f))
        act = F.silu(h[:, :f]).mul_(h[:, f:])
        y = _expert_mm(act, w_out, bounds, xs.new_empty(s_total, w_out[0].shape[0]))
        ctx.save_for_backward(xs, h, *weights)
        ctx.bounds, ctx.f, ctx.num_experts = bounds, f, len(w_in)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        xs, h, *weights = ctx.saved_tensors
        w_in, w_out = weights[0::2], weights[1::2]
        f, bounds = ctx.f, ctx.bounds
        dy = dy.contiguous()
        silu = F.silu(h[:, :f])
        act = silu * h[:, f:]
        d_act = _expert_mm(dy, w_out, bounds, torch.empty_like(act), transpose=False)
        dh = _swiglu_input_grad(d_act, h, silu, torch.empty_like(h), torch.empty_like(act))
        grads: list[Optional[torch.Tensor]] = [None] * (2 * ctx.num_experts)
        if any(ctx.needs_input_grad[2:]):
            _weight_grads(grads, 1, dy, act, bounds)
            _weight_grads(grads, 0, dh, xs, bounds)
        dxs = _expert_mm(dh, w_in, bounds, torch.empty_like(xs), transpose=False) if ctx.needs_input_grad[0] else None
        return (dxs, None, *grads)


def _expert_mm(a: torch.Tensor, weights: Sequence[torch.Tensor], bounds, out: torch.Tensor, transpose: bool = True) -> torch.Tensor:
    """``out[s:t] = a[s:t] @ W_e^T`` (or ``@ W_e``) for each expert's slice, written in place; returns ``out``."""
    for e, s, t in bounds:
        torch.mm(a[s:t], weights[e].t() if transpose else weights[e], out=out[s:t])
    return out


def _weight_grads(grads: list, which: int, left: torch.Tensor, right: torch.Tensor, bounds) -> None:
    """``grads[2e + which] = left[s:t]^T @ right[s:t]`` per expert (which 0: ``w_in``, 1: ``w_out``)."""
    for e, s, t in bounds:
        grads[2 * e + which] = left[s:t].t() @ right[s:t]


def _swiglu_input_grad(d_act: torch.Tensor, h: torch.Tensor, silu: torch.Tensor, out: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """dL/dH [S, 2f] from dL/dact for ``act = silu(g) * u``: up half ``d_act * silu(g)``, gate half ``silu'(g) * d_act * u``."""
    f = silu.shape[1]
    torch.mul(d_act, silu, out=out[:, f:])
    torch.ops.aten.silu_backward.grad_input(torch.mul(d_act, h[:, f:], out=tmp), h[:, :f], grad_input=out[:, :f])
    return out


_LOCAL = threading.local()


def _scratch(name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A reusable [rows, cols] scratch tensor on CPU (fresh elsewhere), one grow-only buffer per name.

    Large fresh CPU allocations are page-faulted on every call with glibc malloc (~0.35 ms/MB here):
    at d=1024, 16k tokens, top-2 a fresh gather costs 45 ms against 9 ms into a warm buffer. Scratch
    never escapes the autograd function that asks for it and is per thread, so reuse is safe.
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


class FusedSwiGLUMoE(torch.autograd.Function):
    """Gather, all SwiGLU experts, weighting and scatter in one autograd node.

    ``out = base + sum_p w_p * SwiGLU_{e_p}(tokens[tok_p])`` with pairs sorted by expert; ``w_p`` is
    applied to the f-wide activation before the down projection (linear, so the same result at 1/8 of
    the traffic when f = d/8). Forward saves only the pre-activations ``H`` [S, 2f], the pair weights
    and the indices: the gathered rows ``xs`` [S, d] are gathered again in backward (one warm copy)
    rather than stored, so every [S, d] and [S, f] temporary of both passes lives in reusable
    scratch and the node saves ``S * 2f`` values instead of ``S * (d + 2f)`` (at d=1024, f=128,
    top-2 of 16k tokens: 32 MB instead of 160 MB per layer).
    ``base`` (shared-expert output) may be ``None`` (zeros).
    """

    @staticmethod
    def forward(ctx, tokens, base, tok, w, counts, *weights):  # type: ignore[override]
        w_in, w_out = weights[0::2], weights[1::2]
        f = w_in[0].shape[0] // 2
        s_total, d = tok.numel(), tokens.shape[1]
        bounds = _bounds(counts)
        rows = torch.index_select(tokens, 0, tok, out=_scratch("rows", s_total, d, tokens))
        h = _expert_mm(rows, w_in, bounds, tokens.new_empty(s_total, 2 * f))
        act = _scratch("act", s_total, f, tokens)
        torch.ops.aten.silu.out(h[:, :f], out=act)
        act.mul_(h[:, f:]).mul_(w.to(act.dtype).unsqueeze(-1))
        _expert_mm(act, w_out, bounds, rows)  # the gathered rows are dead: the expert outputs reuse their buffer
        out = tokens.new_zeros(tokens.shape) if base is None else base.clone()
        out.index_add_(0, tok, rows)
        ctx.save_for_backward(tokens, h, w, tok, *weights)
        ctx.bounds, ctx.f, ctx.num_experts = bounds, f, len(w_in)
        ctx.has_base = base is not None
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        tokens, h, w, tok, *weights = ctx.saved_tensors
        w_in, w_out = weights[0::2], weights[1::2]
        f, bounds = ctx.f, ctx.bounds
        s_total, d = tok.numel(), tokens.shape[1]
        # one [S, d] buffer serves dy, then dxs, then the re-gathered xs
        rows = torch.index_select(dout.contiguous(), 0, tok, out=_scratch("rows", s_total, d, h))
        silu = torch.ops.aten.silu.out(h[:, :f], out=_scratch("silu", s_total, f, h))
        act = torch.mul(silu, h[:, f:], out=_scratch("act", s_total, f, h))
        d_act = _expert_mm(rows, w_out, bounds, _scratch("d_act", s_total, f, h), transpose=False)
        tmp = _scratch("tmp", s_total, f, h)
        # dL/dw_p = <dL/dact_p, act_p> (w_p scales the activation in forward)
        dw = torch.mul(d_act, act, out=tmp).sum(-1).to(w.dtype) if ctx.needs_input_grad[3] else None
        wc = w.to(act.dtype).unsqueeze(-1)
        need_w = any(ctx.needs_input_grad[5:])
        grads: list[Optional[torch.Tensor]] = [None] * (2 * ctx.num_experts)
        if need_w:
            _weight_grads(grads, 1, rows, act.mul_(wc), bounds)
        dh = _swiglu_input_grad(d_act.mul_(wc), h, silu, _scratch("dh", s_total, 2 * f, h), tmp)
        dtokens = None
        if ctx.needs_input_grad[0]:
            dtokens = dout.new_zeros(tokens.shape).index_add_(0, tok, _expert_mm(dh, w_in, bounds, rows, transpose=False))
        if need_w:
            _weight_grads(grads, 0, dh, torch.index_select(tokens, 0, tok, out=rows), bounds)
        dbase = dout if ctx.has_base and ctx.needs_input_grad[1] else None
        return (dtokens, dbase, None, dw, None, *grads)


def fused_swiglu_usable(experts: nn.ModuleList) -> bool:
    """All experts expose ``swiglu_weights`` with one common shape (what :class:`FusedSwiGLUMoE` needs)."""
    if not len(experts) or not all(hasattr(m, "swiglu_weights") for m in experts):
        return False
    return len({tuple(w.shape) for m in experts for w in m.swiglu_weights()[:1]}) == 1


def _bounds(counts: Sequence[int]) -> list[tuple[int, int, int]]:
    out, s = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, s, s + c))
            s += c
    return out


def run_sorted(
    xs: torch.Tensor, counts: Sequence[int], experts: nn.ModuleList, gemm: str = "loop"
) -> torch.Tensor:
    """Apply expert ``e`` to its slice of the expert-sorted rows ``xs`` [S, d]; return [S, d].

    ``gemm``: ``"loop"`` = one GEMM per expert (custom autograd for SwiGLU experts, ``split`` +
    module calls for any other expert kind); ``"grouped"`` = ``torch.nn.functional.grouped_mm`` over
    stacked SwiGLU weights (the fast path on CUDA Hopper; on CPU it is the same loop in C++).
    """
    fused = all(hasattr(m, "swiglu_weights") for m in experts)
    if fused and gemm == "grouped" and hasattr(F, "grouped_mm"):
        return _grouped_swiglu(xs, counts, experts)
    if fused:
        weights = [w for m in experts for w in m.swiglu_weights()]
        if len({w.shape for w in weights[0::2]}) == 1:
            return SortedSwiGLU.apply(xs, list(counts), *weights)
    chunks = xs.split(list(counts))
    outs = [experts[e](c) for e, c in enumerate(chunks) if counts[e]]
    return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])


def _grouped_swiglu(xs: torch.Tensor, counts: Sequence[int], experts: nn.ModuleList) -> torch.Tensor:
    w_in = torch.stack([m.swiglu_weights()[0].t() for m in experts])  # [E, d, 2f]
    w_out = torch.stack([m.swiglu_weights()[1].t() for m in experts])  # [E, f, d]
    offs = torch.tensor(counts, device=xs.device).cumsum(0).to(torch.int32)
    h = F.grouped_mm(xs, w_in, offs=offs)
    g, u = h.chunk(2, dim=-1)
    # grouped_mm needs 16-byte aligned, non-expanded operands (its backward checks strides too)
    act = (F.silu(g) * u).contiguous()
    return F.grouped_mm(act, w_out, offs=offs)


def grouped_mm_usable(d_model: int, d_ff: int, dtype: torch.dtype) -> bool:
    """Whether ``F.grouped_mm`` exists and the shapes meet its 16-byte stride rule."""
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return (d_model * size) % 16 == 0 and (d_ff * size) % 16 == 0


# -- slot dispatch: unique token indices per call (xformers' Triton gather / scatter) -------------


def slot_order(exp: torch.Tensor, tok: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int], list[list[int]]]:
    """Reorder expert-sorted pairs into *slots*: slot ``j`` holds every token's ``j``-th pick.

    Within a slot each token appears at most once (what xformers' ``index_select_cat`` and
    ``scaled_index_add`` require: unique indices per call), and the pairs stay sorted by expert, so
    each slot is a sorted dispatch of its own. Top-k gives ``k`` equal slots; top-p gives as many
    slots as the most picks of any token, shrinking. Returns ``(order, slot_sizes, group_counts)``
    with ``group_counts[j][e]`` the pairs of expert ``e`` in slot ``j``.
    """
    s = tok.numel()
    if s == 0:
        return tok.new_zeros(0), [], []
    by_tok = torch.argsort(tok, stable=True)
    per_tok = torch.bincount(tok)
    first = torch.cumsum(per_tok, 0) - per_tok
    rank = torch.empty_like(tok)
    rank[by_tok] = torch.arange(s, device=tok.device) - first[tok[by_tok]]
    key = rank * num_experts + exp
    order = torch.argsort(key, stable=True)
    n_slots = int(rank.max()) + 1
    groups = torch.bincount(key, minlength=n_slots * num_experts).view(n_slots, num_experts)
    return order, groups.sum(-1).tolist(), groups.tolist()


def _xformers_ops():
    import xformers.ops as xops

    return xops.index_select_cat, xops.scaled_index_add


def slot_gather(tokens: torch.Tensor, slots: Sequence[torch.Tensor], use_xformers: bool) -> torch.Tensor:
    """Rows ``tokens[cat(slots)]`` [S, d]; one xformers ``index_select_cat`` call over all slots when asked."""
    if use_xformers:
        index_select_cat, _ = _xformers_ops()
        return index_select_cat([tokens] * len(slots), list(slots)).view(-1, tokens.shape[1])
    return tokens.index_select(0, torch.cat(list(slots)))


def slot_scatter_(out: torch.Tensor, slots: Sequence[torch.Tensor], rows: Sequence[torch.Tensor], use_xformers: bool) -> torch.Tensor:
    """``out[slot] += rows`` for each slot (unique indices per slot), in place; returns ``out``.

    With xformers, one ``scaled_index_add`` per slot (its Triton kernel needs unique indices and a
    [B, M, D] layout, hence the [N, 1, d] views); no atomics, so the combine is deterministic.
    """
    if use_xformers:
        _, scaled_index_add = _xformers_ops()
        n, d = out.shape
        view = out.view(n, 1, d)
        for idx, r in zip(slots, rows):
            view = scaled_index_add(view, idx, r.reshape(-1, 1, d))
        return view.view(n, d)
    for idx, r in zip(slots, rows):
        out.index_add_(0, idx, r)
    return out


PLANS = ("fused", "loop", "grouped", "slots")


def combine_pairs(
    plan: str,
    tokens: torch.Tensor,
    base: Optional[torch.Tensor],
    exp: torch.Tensor,
    tok: torch.Tensor,
    counts: Sequence[int],
    w_pairs: torch.Tensor,
    experts: nn.ModuleList,
    use_xformers: bool = False,
) -> torch.Tensor:
    """``base + sum_p w_p * expert_{e_p}(tokens[tok_p])`` [N, d] for expert-sorted pairs, by one of :data:`PLANS`.

    - ``fused``: :class:`FusedSwiGLUMoE` (one autograd node, scratch buffers; SwiGLU experts of one width);
    - ``loop``: gather, one module call per expert (``split``), weighted ``index_add``; any expert kind;
    - ``grouped``: as ``loop`` with ``F.grouped_mm`` over the stacked SwiGLU weights;
    - ``slots``: :func:`slot_order` + per-slot grouped/loop compute, gather and scatter through
      xformers' Triton ops when ``use_xformers`` (else the same maths in torch ops).
    ``base`` (the shared experts' output, or None for zeros) is never modified.
    """
    if plan == "fused":
        ws = [w for m in experts for w in m.swiglu_weights()]
        return FusedSwiGLUMoE.apply(tokens, base, tok, w_pairs, list(counts), *ws)
    out = tokens.new_zeros(tokens.shape) if base is None else base.clone()
    if plan in ("loop", "grouped"):
        ys = run_sorted(tokens.index_select(0, tok), counts, experts, gemm=plan)
        return out.index_add_(0, tok, ys * w_pairs.to(ys.dtype).unsqueeze(-1))
    if plan != "slots":
        raise ValueError(f"dispatch plan {plan!r} is not one of {PLANS}")
    order, sizes, groups = slot_order(exp, tok, len(experts))
    slots = tok[order].split(sizes)
    xs = slot_gather(tokens, slots, use_xformers)
    d_ff = getattr(experts[0], "d_ff", 1) if len(experts) else 1
    on_gpu = tokens.device.type == "cuda" and fused_swiglu_usable(experts)
    gemm = "grouped" if on_gpu and grouped_mm_usable(tokens.shape[1], d_ff, tokens.dtype) else "loop"
    ys = torch.cat([run_sorted(chunk, g, experts, gemm=gemm) for chunk, g in zip(xs.split(sizes), groups)])
    ys = ys * w_pairs[order].to(ys.dtype).unsqueeze(-1)
    return slot_scatter_(out, slots, ys.split(sizes), use_xformers)


_CHOICES: dict[tuple, str] = {}


def choose_plan(key: tuple, candidates: Sequence[str], run: Callable[[str], object], reps: int = 3) -> str:
    """The fastest of ``candidates`` for this shape ``key``, timed once on the real inputs and cached.

    ``run(plan)`` computes the piece with that plan (called under ``no_grad``: a forward-time
    proxy); the MoE layer's expert part and the MoE blocks' attention kernel are chosen this way. A plan that raises (a kernel missing on this GPU) is skipped with a
    warning. One log line per key gives every candidate's time and the choice.
    """
    if len(candidates) == 1:
        return candidates[0]
    if key in _CHOICES:
        return _CHOICES[key]
    cuda = any(isinstance(k, torch.device) and k.type == "cuda" for k in key)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, float] = {}
    for plan in candidates:
        try:
            with torch.no_grad():
                run(plan)  # warm-up: Triton compilation, cuBLAS heuristics
                sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    run(plan)
                sync()
            times[plan] = (time.perf_counter() - t0) / reps
        except Exception as exc:  # noqa: BLE001 - any kernel failure just removes that candidate
            log.warning("audiomoe MoE dispatch plan %r failed for %s and is not used: %s", plan, key, exc)
    if not times:
        raise RuntimeError(f"no MoE dispatch plan ran for {key}: tried {list(candidates)}")
    best = min(times, key=times.__getitem__)
    _CHOICES[key] = best
    log.info("audiomoe MoE dispatch for %s: %s (%s)", key, best, ", ".join(f"{p} {t * 1e3:.3f} ms" for p, t in times.items()))
    return best


def chosen_plans() -> dict[tuple, str]:
    """The dispatch plans picked so far by :func:`choose_plan`, by shape key (for logs and benchmarks)."""
    return dict(_CHOICES)
