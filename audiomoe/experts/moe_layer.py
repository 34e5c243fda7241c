"""Mixture-of-experts FFN layer: routed, shared and null experts with sorted dropless dispatch.

``y_t = sum_{e in S(t), e routed} w_{t,e} FFN_e(x_t) + sum_s v_{t,s} Shared_s(x_t)``
(Shazeer et al. 2017; shared experts: DeepSeekMoE, Dai et al. 2024; null experts and dynamic
capacity: UniMoE-Audio, arXiv 2510.13344). The router scores ``num_experts + num_null`` columns;
null columns are never computed (their weight multiplies a zero output), so a token's cost follows
its *real* picks and a token that picks only null experts gets the shared-only output.

Shared weights ``v``: ``shared_mode="unit"`` adds each shared expert with weight 1 (DeepSeekMoE);
``"gated"`` follows UniMoE-Audio's code (``calculate_audio_global_routing_weight``): a bias-free gate
owned by this layer scores the shared columns, ``g = softmax([logits masked to the selected routed
and null columns, shared logits])``, routed weights become ``w * sum_{dynamic} g`` and shared
expert ``s`` gets ``g_s``.

Dispatch (``dispatch.py``): pairs sorted by expert, one GEMM per expert on a contiguous slice (or
torch's grouped matmul), one weighted ``index_add`` back; on CUDA the fastest of the usable plans
(fused loop, grouped matmul, xformers slot gather/scatter) is measured once per shape and kept. Dropless by default; with a
``capacity_factor`` each expert keeps at most ``C`` pairs (by position or by router logit), and the
drops are counted per token on the routing record (``routing.dropped``) and in ``last_stats``.
``C = max(min_capacity, ceil(cf * B / columns))`` with ``B`` the selected pairs (GShard's
``cf * k * T / E``, ``capacity_basis="pairs"``) or the valid tokens (UniMoE-Audio's
``_capacity``, ``"tokens"``). ``renormalize_drops=True`` follows UniMoE-Audio after a drop: the
kept routed and null weights are rescaled to the token's selected mass, and the shared gate's joint
softmax sees only the kept columns. Padded tokens are neither routed, computed nor counted; their
output is zero.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Routing
from audiomoe.experts.backends import resolve_backend
from audiomoe.experts.dispatch import (
    PLANS,
    capacity_of,
    choose_plan,
    combine_pairs,
    drop_over_capacity,
    fused_swiglu_usable,
    grouped_mm_usable,
    sorted_pairs,
)


class MoELayer(nn.Module):
    """Router + ``num_experts`` routed experts (+ ``num_shared`` shared, + ``num_null`` null columns).

    Args:
        d_model: token width.
        num_experts: routed (computed) experts.
        router: Builder of the router; it is asked for ``num_experts + num_null`` columns, null last.
        expert: Builder of the routed experts (called ``num_experts`` times).
        num_null: null columns (never computed).
        num_shared: always-on shared experts.
        shared_expert: Builder of the shared experts (default: the ``expert`` Builder).
        shared_d_ff: width injected into each shared expert (``d_ff`` keyword; default: its own).
        shared_mode: ``"gated"`` (UniMoE-Audio) or ``"unit"`` (DeepSeekMoE).
        capacity_factor: ``None`` = dropless; else per-expert capacity ``ceil(cf * mean column load)``.
        min_capacity: lower bound of the capacity.
        drop_policy: ``"position"`` (keep first tokens) or ``"probs"`` (keep largest router logits).
        capacity_basis: ``"pairs"`` (capacity from selected pairs, GShard) or ``"tokens"`` (UniMoE-Audio).
        renormalize_drops: rescale each token's kept weights to its selected mass after drops (UniMoE-Audio).
        backend: ``"auto"``, ``"torch"`` or ``"xformers"`` (CUDA only; falls back to torch with a log line).
        task_names: the model's tasks, injected into the router (per-task tables, oracle routing).
        dispatch: ``"auto"`` or one plan of :func:`audiomoe.experts.dispatch.combine_pairs`
            (``fused``, ``loop``, ``grouped``, ``slots``). Auto: on CPU ``fused`` for SwiGLU experts of
            one width, else ``loop``; on CUDA the fastest of the usable plans (``grouped`` where
            torch's grouped matmul takes the shapes, ``slots`` with xformers' Triton gather/scatter
            when the backend is xformers), timed once per shape and logged.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        router: Any,
        expert: Any,
        num_null: int = 0,
        num_shared: int = 0,
        shared_expert: Any = None,
        shared_d_ff: Optional[int] = None,
        shared_mode: Literal["gated", "unit"] = "gated",
        capacity_factor: Optional[float] = None,
        min_capacity: int = 1,
        drop_policy: Literal["position", "probs"] = "position",
        capacity_basis: Literal["pairs", "tokens"] = "pairs",
        renormalize_drops: bool = False,
        backend: Literal["auto", "torch", "xformers"] = "auto",
        task_names: Optional[list[str]] = None,
        dispatch: Literal["auto", "fused", "loop", "grouped", "slots"] = "auto",
    ) -> None:
        super().__init__()
        if num_experts < 1 or num_null < 0 or num_shared < 0:
            raise AudioMoEError(
                f"MoE layer needs num_experts >= 1, num_null >= 0, num_shared >= 0 (got {num_experts}, {num_null}, {num_shared})"
            )
        if shared_mode not in ("gated", "unit"):
            raise AudioMoEError(f"shared_mode {shared_mode!r} is not one of 'gated', 'unit'")
        if drop_policy not in ("position", "probs"):
            raise AudioMoEError(f"drop_policy {drop_policy!r} is not one of 'position', 'probs'")
        if dispatch != "auto" and dispatch not in PLANS:
            raise AudioMoEError(f"dispatch {dispatch!r} is not one of 'auto', {', '.join(repr(p) for p in PLANS)}")
        if capacity_basis not in ("pairs", "tokens"):
            raise AudioMoEError(f"capacity_basis {capacity_basis!r} is not one of 'pairs', 'tokens'")
        if capacity_factor is not None and capacity_factor <= 0:
            raise AudioMoEError(f"capacity_factor={capacity_factor} must be > 0 (or None for dropless)")
        self.d_model, self.num_experts, self.num_null, self.num_shared = d_model, num_experts, num_null, num_shared
        self.shared_mode, self.capacity_factor, self.min_capacity = shared_mode, capacity_factor, min_capacity
        self.drop_policy, self.backend = drop_policy, backend
        self.capacity_basis, self.renormalize_drops = capacity_basis, renormalize_drops
        self.dispatch = dispatch
        self.last_plan: Optional[str] = None
        self.router = router(d_model=d_model, num_experts=num_experts + num_null, task_names=task_names)
        self.experts = nn.ModuleList([expert(d_model=d_model) for _ in range(num_experts)])
        shared_builder = shared_expert or expert
        extra = {} if shared_d_ff is None else {"d_ff": shared_d_ff}
        self.shared = nn.ModuleList([shared_builder(d_model=d_model, **extra) for _ in range(num_shared)])
        self.shared_gate = nn.Linear(d_model, num_shared, bias=False) if num_shared and shared_mode == "gated" else None
        self.last_stats: dict[str, float] = {}
        # experts are fixed after construction: decide once whether the fused SwiGLU node can take them
        self._fused_ok = fused_swiglu_usable(self.experts)
        if dispatch in ("fused", "grouped") and not self._fused_ok:
            raise AudioMoEError(f"dispatch={dispatch!r} needs SwiGLU experts of one width (expert kind here: {type(self.experts[0]).__name__}); use 'loop' or 'auto'")

    def forward(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Routing]:
        """Route and combine ``x`` [B, N, D] (or [N, D]); ``padding_mask`` True = padded. Returns ``(y, routing)``.

        ``task_ids``: [B] (one task per sequence, repeated over its tokens) or one per token, passed to
        the router.
        """
        shape = x.shape
        if shape[-1] != self.d_model:
            raise AudioMoEError(f"MoE layer expects width d_model={self.d_model}, got input of shape {tuple(shape)}")
        tokens = x.reshape(-1, shape[-1])
        item_mask = None if padding_mask is None else ~padding_mask.reshape(-1).to(torch.bool)
        kwargs = {}
        if task_ids is not None:
            task_ids = task_ids.to(device=x.device, dtype=torch.long)
            if x.dim() == 3 and tuple(task_ids.shape) == (shape[0],):
                task_ids = task_ids[:, None].expand(shape[0], shape[1])
            if task_ids.numel() != tokens.shape[0]:
                raise AudioMoEError(
                    f"task_ids of shape {tuple(task_ids.shape)} match neither the batch ({shape[0]},) nor the tokens {tuple(shape[:-1])}"
                )
            kwargs["task_ids"] = task_ids.reshape(-1)
        routing = self.router(tokens, item_mask=item_mask, **kwargs)
        routing.null_columns = self.num_null
        routing.item_shape = tuple(shape[:-1])
        if routing.item_mask is None:
            routing.item_mask = item_mask
        return self.combine(tokens, routing).reshape(shape), routing

    def combine(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Compute the layer output [N, D] for ``tokens`` [N, D] under a given routing decision.

        Public so that a routing can be fixed (benchmarks) or written by hand (tests).
        """
        n_cols = self.num_experts + self.num_null
        if routing.mask.shape != (tokens.shape[0], n_cols):
            raise AudioMoEError(
                f"routing mask has shape {tuple(routing.mask.shape)}, expected ({tokens.shape[0]}, {n_cols}) "
                f"= (tokens, num_experts + num_null)"
            )
        item_mask = routing.item_mask
        mask = routing.mask if item_mask is None else routing.mask & item_mask[:, None]
        n_valid = int(mask.shape[0] if item_mask is None else item_mask.sum())
        exp, tok, counts = sorted_pairs(mask, self.num_experts)
        weights, gate_mask = routing.weights, mask
        dropped, capacity = 0, None
        routing.dropped = None
        if self.capacity_factor is not None:
            basis = int(mask.sum()) if self.capacity_basis == "pairs" else n_valid
            capacity = capacity_of(basis, n_cols, self.capacity_factor, self.min_capacity)
            scores = routing.logits.detach()[tok, exp] if self.drop_policy == "probs" else None
            exp, tok, counts, d_exp, d_tok = drop_over_capacity(exp, tok, counts, capacity, self.drop_policy, scores)
            dropped = int(d_tok.numel())
            routing.dropped = torch.bincount(d_tok, minlength=mask.shape[0])
            if dropped and self.renormalize_drops:
                gate_mask = mask.clone()
                gate_mask[d_tok, d_exp] = False
                selected = (weights * mask).sum(-1, keepdim=True)
                weights = weights * gate_mask
                kept = weights.sum(-1, keepdim=True)
                # a token that lost every pick keeps zero weight (UniMoE: +1e-6); the double where
                # keeps the unused branch finite so no NaN reaches the gradient
                has = kept != 0
                weights = weights * torch.where(has, selected / torch.where(has, kept, torch.ones_like(kept)), torch.zeros_like(kept))
        shared_w = None
        if self.shared_gate is not None:
            ct = torch.promote_types(routing.logits.dtype, torch.float32)  # softmax in fp32 at least
            shared_logits = self.shared_gate(tokens).to(ct)
            dyn = routing.logits.to(ct).masked_fill(~gate_mask, float("-inf"))
            joint = torch.cat([dyn, shared_logits], -1).softmax(-1)
            weights = weights * joint[:, :n_cols].sum(-1, keepdim=True).to(weights.dtype)
            shared_w = joint[:, n_cols:].to(tokens.dtype)
        counts_list = counts.tolist()

        out = self._shared_output(tokens, item_mask, shared_w)
        if exp.numel():
            w_pairs = weights[tok, exp]
            plan, use_x = self._plan(tokens, exp, tok, counts_list, w_pairs)
            out = combine_pairs(plan, tokens, out, exp, tok, counts_list, w_pairs, self.experts, use_x)
        if out is None:
            out = tokens.new_zeros(tokens.shape)
        self.last_stats = {
            "tokens": n_valid,
            "routed_pairs": int(exp.numel()),
            "dropped_pairs": dropped,
            "capacity": -1 if capacity is None else capacity,
            "routed_per_token": exp.numel() / max(n_valid, 1),
        }
        return out

    def _plan(self, tokens: torch.Tensor, exp: torch.Tensor, tok: torch.Tensor, counts: list[int], w_pairs: torch.Tensor) -> tuple[str, bool]:
        """(dispatch plan, whether the slot plan uses xformers' Triton ops) for this call."""
        use_x = resolve_backend(self.backend, tokens.device) == "xformers"
        fused_ok = self._fused_ok
        if self.dispatch != "auto":
            plan = self.dispatch
            if plan == "grouped" and not grouped_mm_usable(self.d_model, getattr(self.experts[0], "d_ff", 0), tokens.dtype):
                raise AudioMoEError(
                    f"dispatch='grouped' needs torch's F.grouped_mm, float32/bfloat16/float16 and widths whose rows are "
                    f"multiples of 16 bytes (d_model={self.d_model}, dtype {tokens.dtype}); use 'auto', 'fused' or 'loop'"
                )
        elif tokens.device.type != "cuda":
            plan = "fused" if fused_ok else "loop"
        else:
            d_ff = getattr(self.experts[0], "d_ff", 0)
            candidates = ["fused" if fused_ok else "loop"]
            if fused_ok and grouped_mm_usable(self.d_model, d_ff, tokens.dtype):
                candidates.append("grouped")
            if use_x:
                candidates.append("slots")
            bucket = 1 << max(int(exp.numel()) - 1, 0).bit_length()  # pairs rounded up to a power of 2
            key = (tokens.device, tokens.dtype, self.d_model, d_ff, self.num_experts, use_x, bucket)
            plan = choose_plan(
                key, candidates, lambda p: combine_pairs(p, tokens, None, exp, tok, counts, w_pairs, self.experts, use_x)
            )
        self.last_plan = plan
        return plan, use_x

    def _shared_output(
        self, tokens: torch.Tensor, item_mask: Optional[torch.Tensor], shared_w: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """Shared experts' output [N, D] (None without shared experts); padded rows are zero."""
        if not self.num_shared:
            return None
        idx = None
        if item_mask is not None and not bool(item_mask.all()):
            idx = item_mask.nonzero(as_tuple=True)[0]
            xv = tokens.index_select(0, idx)
            shared_w = None if shared_w is None else shared_w.index_select(0, idx)
        else:
            xv = tokens
        ys = None
        for s, expert in enumerate(self.shared):
            y = expert(xv)
            if shared_w is not None:
                y = y * shared_w[:, s : s + 1]
            ys = y if ys is None else ys + y
        if idx is None:
            return ys
        return tokens.new_zeros(tokens.shape).index_add_(0, idx, ys)

    def num_active_parameters(self) -> float:
        """Router + shared experts (+ their gate) + the routed experts an average valid token uses.

        The average is measured from the last forward (top-p picks vary per token; null picks cost
        nothing); before any forward it is the router's ``k`` if it has one, else every routed expert
        (an upper bound).
        """
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        fixed = count(self.router) + count(self.shared) + (count(self.shared_gate) if self.shared_gate is not None else 0)
        per_expert = count(self.experts) / max(len(self.experts), 1)
        if "routed_per_token" in self.last_stats:
            k = self.last_stats["routed_per_token"]
        else:
            k = getattr(self.router, "k", None) or getattr(getattr(self.router, "params", None), "k", None) or self.num_experts
            k = min(float(k), float(self.num_experts))
        return fixed + per_expert * k
