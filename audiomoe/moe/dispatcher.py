"""The MoE dispatcher: sort (token, expert) pairs by expert, run the expert group, combine.

A sibling of the experts inside an MoE layer (torchtitan's ``token_dispatcher.py`` beside
``GroupedExperts``), holding no weights. Plans, each equal to the reference loop in outputs and
gradients:

- ``fused``: :class:`audiomoe.moe.fused.FusedSwiGLUMoE`, one autograd node (CPU default for
  grouped SwiGLU experts);
- ``grouped_mm``: ``F.grouped_mm`` over the stacked weights (CUDA default where the shapes meet its
  16-byte rule);
- ``xformers``: every token's j-th pick in slot j (unique indices per call), gathered and combined
  through xformers' Triton ``index_select_cat`` / ``scaled_index_add`` (CUDA with xformers;
  elsewhere the same slot maths in torch ops, with one log line);
- ``dense``: every expert on every token (one GEMM over all experts' gate|up rows, one batched
  GEMM down, :meth:`GroupedSwiGLU.forward_all`), weighted by the ``[N, E]`` combine weights, zero
  outside the picks: the default when no gradient is taken and that compute is small (a KV-cached
  decoding step of a small model: a handful of ops, no sort, no weight copy);
- ``gathered``: each pair's expert weights gathered and applied by one batched GEMV per
  projection (about ten ops whatever the number of experts): the default when no gradient is
  taken and the pairs' gathered weights are small but ``dense`` is not (a decoding step of a
  larger model, where the per-expert plans pay per-expert call overhead for one token);
- ``picked``: each picked expert on its own tokens through views of the stacked weights (no weight
  copy, no sort; the picks are read on the host): the CPU default for a no-grad call of at most
  :data:`PICKED_TOKENS` tokens that ``dense`` does not take (a decoding step of a larger model reads
  only the ``k`` picked experts' weights, as transformers' MoE blocks do);
- ``loop``: one call per expert, plain autograd: the reference, and the only plan for expert kinds
  without a grouped form.

The plan is decided once, deterministically (never timed inside ``forward``), so every rank of a
distributed run computes the same numerics: ``auto`` takes the default above unless a plan table
(``audiomoe bench moe MODEL --tune FILE`` times the plans on the model's own layer shapes and writes
one, :mod:`audiomoe.moe.tune`; ``moe.plan_table`` reads it) names another plan for this layer's
shape. A table is timed on fwd+bwd, so a no-grad decoding-sized call keeps ``dense`` / ``gathered``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.moe.backends import resolve_backend
from audiomoe.moe.fused import FusedSwiGLUMoE
from audiomoe.moe.grouped import GroupedSwiGLU, grouped_mm_usable

log = logging.getLogger("audiomoe.experts")
PLANS = ("fused", "grouped_mm", "xformers", "gathered", "dense", "picked", "loop")
#: without autograd, ``auto`` takes ``dense`` while every expert on every token (N x E x 3FD) is at most this many
#: multiply-adds, else ``gathered`` while the pairs' gathered weights (S x 3FD) are at most this many elements
GATHER_LIMIT = 1 << 20
#: without autograd on CPU, ``auto`` takes ``picked`` for calls of at most this many tokens that ``dense`` does not take
#: (per-expert calls stay few; reading the picks on the host is free on CPU, a sync on CUDA, where ``gathered`` runs)
PICKED_TOKENS = 16


def sorted_pairs(mask: torch.Tensor, num_routed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(expert_idx, token_idx, counts)`` of the selected pairs over the first ``num_routed`` columns.

    Pairs are ordered by expert, then token; ``counts`` [num_routed] is each expert's load. Null
    columns (after ``num_routed``) are never listed: they cost nothing.
    """
    exp, tok = mask[:, :num_routed].t().nonzero(as_tuple=True)
    return exp, tok, torch.bincount(exp, minlength=num_routed)


def plan_key(device: torch.device, dtype: torch.dtype, experts: nn.Module) -> str:
    """The plan-table key of a layer: device type, dtype, widths and expert count."""
    d, f = getattr(experts, "d_model", 0), getattr(experts, "d_ff", 0)
    return f"{device.type}:{str(dtype).replace('torch.', '')}:d{d}:f{f}:e{len(experts)}"


def load_plan_table(path: Optional[str]) -> dict[str, str]:
    """Read a plan table (JSON ``{plan_key: plan}``); None gives an empty table."""
    if not path:
        return {}
    try:
        with open(os.fspath(path), encoding="utf-8") as fh:
            table = json.load(fh)
    except (OSError, ValueError) as exc:
        raise AudioMoEError(
            f"cannot read the MoE plan table '{path}': {exc}; write one with `audiomoe bench moe MODEL --tune FILE`"
        ) from exc
    bad = {k: v for k, v in table.items() if v not in PLANS} if isinstance(table, dict) else {"<file>": table}
    if bad:
        raise AudioMoEError(f"plan table '{path}' names unknown plans {bad}; plans are {', '.join(PLANS)}")
    return table


def check_plan(plan: str, experts: nn.Module) -> None:
    """Refuse at build time a plan the expert kind cannot run (named, with what to use instead)."""
    if plan not in ("auto", *PLANS):
        raise AudioMoEError(f"dispatch {plan!r} is not one of 'auto', {', '.join(repr(p) for p in PLANS)}")
    if plan in ("fused", "grouped_mm", "gathered", "picked") and not isinstance(experts, GroupedSwiGLU):
        raise AudioMoEError(
            f"dispatch={plan!r} needs grouped SwiGLU experts (expert kind here has no grouped form: {type(experts).__name__}); use 'loop' or 'auto'"
        )


class Dispatcher(nn.Module):
    """Runs one layer's expert part with a plan fixed by config (``auto``: the deterministic default)."""

    def __init__(self, plan: str = "auto", table: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        self.plan, self.table = plan, dict(table or {})
        self.last_plan: Optional[str] = None

    def extra_repr(self) -> str:
        return f"plan={self.plan!r}" + (f", table={len(self.table)} entries" if self.table else "")

    def plan_for(self, experts: nn.Module, tokens: torch.Tensor, pairs: Optional[int] = None) -> str:
        """The plan this call runs: the configured one, the table's entry for this shape, or the default for ``pairs`` pairs.

        ``pairs`` None: not counted yet (the MoE layer asks before sorting whether ``dense`` runs).
        """
        grouped = isinstance(experts, GroupedSwiGLU)
        if self.plan != "auto":
            plan = self.plan
        elif not grouped:
            plan = "loop"
        elif (
            not torch.is_grad_enabled()
            and tokens.shape[0] * len(experts) * 3 * experts.d_model * experts.d_ff <= GATHER_LIMIT
        ):
            plan = "dense"
        elif not torch.is_grad_enabled() and tokens.device.type == "cpu" and tokens.shape[0] <= PICKED_TOKENS:
            plan = "picked"
        elif (
            not torch.is_grad_enabled()
            and pairs is not None
            and pairs * 3 * experts.d_model * experts.d_ff <= GATHER_LIMIT
        ):
            plan = "gathered"
        elif (
            self.table and plan_key(tokens.device, tokens.dtype, experts) in self.table
        ):  # tuned on fwd+bwd: not for decoding steps
            plan = self.table[plan_key(tokens.device, tokens.dtype, experts)]
        elif tokens.device.type == "cuda" and grouped_mm_usable(experts.d_model, experts.d_ff, tokens.dtype):
            plan = "grouped_mm"
        else:
            plan = "fused"
        if plan == "grouped_mm" and not grouped_mm_usable(
            getattr(experts, "d_model", 0), getattr(experts, "d_ff", 0), tokens.dtype
        ):
            raise AudioMoEError(
                f"dispatch='grouped_mm' needs torch's F.grouped_mm, float32/bfloat16/float16 and widths whose rows are "
                f"multiples of 16 bytes (d_model={getattr(experts, 'd_model', '?')}, dtype {tokens.dtype}); use 'auto', 'fused' or 'loop'"
            )
        return plan

    def forward(
        self,
        tokens: torch.Tensor,
        base: Optional[torch.Tensor],
        exp: torch.Tensor,
        tok: torch.Tensor,
        counts: Sequence[int],
        w_pairs: torch.Tensor,
        experts: nn.Module,
    ) -> torch.Tensor:
        """``base + sum_p w_p * expert_{e_p}(tokens[tok_p])`` [N, D] for expert-sorted pairs; ``base`` is never modified."""
        plan = self.last_plan = self.plan_for(experts, tokens, tok.numel())
        if plan == "fused":
            return FusedSwiGLUMoE.apply(
                tokens, base, tok, w_pairs, list(counts), experts.gate_up_proj, experts.down_proj
            )
        out = tokens.new_zeros(tokens.shape) if base is None else base.clone()
        if plan == "gathered":
            return out.index_add_(0, tok, experts.forward_gathered(tokens.index_select(0, tok), exp, w_pairs))
        if plan in ("dense", "picked"):
            w = w_pairs.new_zeros(tokens.shape[0], len(experts)).index_put((tok, exp), w_pairs)
            if plan == "dense":
                return out + experts.forward_all(tokens, w)
            picked = torch.zeros_like(w, dtype=torch.bool).index_put((tok, exp), torch.ones_like(tok, dtype=torch.bool))
            return out + experts.forward_picked(tokens, picked, w)
        if plan == "xformers":
            return _slots(tokens, out, exp, tok, w_pairs, experts)
        xs = tokens.index_select(0, tok)
        ys = experts.forward_grouped_mm(xs, counts) if plan == "grouped_mm" else experts.forward_sorted(xs, counts)
        return out.index_add_(0, tok, ys * w_pairs.to(ys.dtype).unsqueeze(-1))


# -- the xformers plan: unique token indices per call ---------------------------------------------


def slot_order(
    exp: torch.Tensor, tok: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, list[int], list[list[int]]]:
    """Reorder expert-sorted pairs into *slots*: slot ``j`` holds every token's ``j``-th pick.

    Within a slot each token appears at most once (what xformers' ``index_select_cat`` and
    ``scaled_index_add`` require), and the pairs stay sorted by expert, so each slot is a sorted
    dispatch of its own. Returns ``(order, slot_sizes, group_counts)`` with ``group_counts[j][e]``
    the pairs of expert ``e`` in slot ``j``.
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


def _slots(
    tokens: torch.Tensor,
    out: torch.Tensor,
    exp: torch.Tensor,
    tok: torch.Tensor,
    w_pairs: torch.Tensor,
    experts: nn.Module,
) -> torch.Tensor:
    """Slot dispatch: one gather over all slots, each slot's sorted compute, one scatter per slot."""
    use_x = resolve_backend("xformers", tokens.device) == "xformers"  # logs once when it falls back
    order, sizes, groups = slot_order(exp, tok, len(experts))
    slots = tok[order].split(sizes)
    if use_x:
        import xformers.ops as xops

        xs = xops.index_select_cat([tokens] * len(slots), list(slots)).view(-1, tokens.shape[1])
    else:
        xs = tokens.index_select(0, torch.cat(list(slots)))
    grouped = (
        isinstance(experts, GroupedSwiGLU)
        and tokens.device.type == "cuda"
        and grouped_mm_usable(experts.d_model, experts.d_ff, tokens.dtype)
    )
    run = experts.forward_grouped_mm if grouped else experts.forward_sorted
    ys = torch.cat([run(chunk, g) for chunk, g in zip(xs.split(sizes), groups)])
    ys = ys * w_pairs[order].to(ys.dtype).unsqueeze(-1)
    if not use_x:
        return out.index_add_(0, torch.cat(list(slots)), ys)
    import xformers.ops as xops

    n, d = out.shape
    view = out.view(n, 1, d)
    # scaled_index_add needs unique indices per call and a [B, M, D] layout; no atomics: deterministic
    for idx, r in zip(slots, ys.split(sizes)):
        view = xops.scaled_index_add(view, idx, r.reshape(-1, 1, d))
    return view.view(n, d)
