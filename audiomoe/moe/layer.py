"""The MoE layer (component kind ``moe``): router + grouped routed experts + shared experts + dispatcher.

``y_t = sum_{e in S(t), e routed} w_{t,e} FFN_e(x_t) + sum_s v_{t,s} Shared_s(x_t)``
(Shazeer et al. 2017; shared experts: DeepSeekMoE, Dai et al. 2024; null experts and dynamic
capacity: UniMoE-Audio, arXiv 2510.13344). The router scores ``num_experts + num_null`` columns;
null columns are never computed (their weight multiplies a zero output), so a token's cost follows
its *real* picks; a token with only null picks, or none at all (expert-choice routing), gets the
shared-only (or zero) output. Padded tokens are neither routed, computed nor counted.

Parts, as torchtune's ``MoE(experts, router, shared_expert)`` and torchtitan's ``moe.py``: the
router (a slot), the routed experts as one grouped module (:mod:`audiomoe.moe.grouped`), the
shared experts as a small group of their own, and the dispatcher (:mod:`audiomoe.moe.dispatcher`),
siblings each replaceable. Capacity, drops, renormalisation and shared gating are the functions of
:mod:`audiomoe.moe.functional`. One ``Params`` model holds every MoE option, used unchanged
by every backbone and by upcycling (``--set backbone.moe.router=top_p --set backbone.moe.num_null=1``).

Shared weights ``v``: ``unit`` adds each shared expert with weight 1 (DeepSeekMoE); ``gated`` as
UniMoE-Audio's code: a bias-free gate over the shared columns scores the input the router's scorer
saw (``Routing.inputs``: after the training jitter, in fp32 when the gate is, as the released single
gate over all columns) and a joint softmax splits the mass. The weights finally applied (after
drops, renormalisation and the shared share) are ``routing.applied``, the shared experts'
``routing.shared_weights``; the routing trace reports those.

Expert parallelism (``expert_parallel: N``, UniMoE-Audio's EP 4): after
:func:`audiomoe.moe.expert_parallel.shard_experts` each rank holds ``num_experts / N`` routed
experts and :func:`~audiomoe.moe.expert_parallel.ep_combine` replaces the local dispatch (routing,
drops and shared experts stay local); unsharded, the layer is the full one-process layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import MoE, Routing
from audiomoe.core.routing import routing_problems
from audiomoe.core.specs import ComponentSpec, Params, Slot
from audiomoe.moe.dispatcher import PLANS, Dispatcher, check_plan, load_plan_table, sorted_pairs
from audiomoe.moe.expert_parallel import check_divisible, ep_combine, warn_unsharded
from audiomoe.moe.functional import (
    as_dtype,
    capacity_of,
    drop_over_capacity,
    gate_shared,
    null_drops,
    renormalize_after_drops,
)
from audiomoe.moe.grouped import LoopExperts, build_experts
from audiomoe.routers.functional import LazyRouting


class DenseStepStats(Mapping):
    """``last_stats`` of a ``dense`` step, read from the device only when asked (a decoding step never waits on it)."""

    def __init__(self, routed: torch.Tensor, item_mask: Optional[torch.Tensor]) -> None:
        self._routed, self._item_mask = routed, item_mask  # the picks [N, E]; the loads are summed when read
        self._stats: Optional[dict[str, Any]] = None

    def _get(self) -> dict[str, Any]:
        if self._stats is None:
            n_valid = self._routed.shape[0] if self._item_mask is None else int(self._item_mask.sum())
            counts = self._routed.sum(0).tolist()
            pairs = sum(counts)
            self._stats = {
                "tokens": n_valid,
                "routed_pairs": pairs,
                "dropped_pairs": 0,
                "capacity": -1,
                "routed_per_token": pairs / max(n_valid, 1),
                "expert_loads": counts,
            }
        return self._stats

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class MoELayer(MoE):
    """Router + ``num_experts`` routed experts (+ ``num_shared`` shared, + ``num_null`` null columns)."""

    class Params(Params):
        router: Annotated[ComponentSpec, Slot("router")] = Field(
            default_factory=lambda: ComponentSpec(name="top_k"),
            description="routing policy (asked for num_experts + num_null columns)",
        )
        expert: Annotated[ComponentSpec, Slot("expert")] = Field(
            default_factory=lambda: ComponentSpec(name="swiglu"), description="expert FFN kind (routed and shared)"
        )
        num_experts: int = Field(4, ge=1, le=4096, description="routed experts")
        num_null: int = Field(
            0, ge=0, le=4096, description="null experts (router columns with zero output, never computed)"
        )
        num_shared: int = Field(0, ge=0, le=64, description="shared experts (always run)")
        shared_d_ff: Optional[int] = Field(
            None, ge=1, le=1_048_576, description="width of each shared expert (None: the expert's own)"
        )
        shared_mode: Literal["gated", "unit"] = Field(
            "gated",
            description="shared weighting: gated = joint softmax with the routed mass (UniMoE-Audio), unit = weight 1 (DeepSeekMoE)",
        )
        capacity_factor: Optional[float] = Field(
            None, gt=0.0, le=64.0, description="per-expert capacity factor; None = dropless"
        )
        min_capacity: int = Field(1, ge=1, le=1 << 30, description="lower bound of the per-expert capacity")
        drop_policy: Literal["position", "probs"] = Field("position", description="which pairs survive over capacity")
        capacity_basis: Literal["pairs", "tokens"] = Field(
            "pairs",
            description="capacity from selected pairs (GShard cf*k*T/E) or from valid tokens (cf*T/E; UniMoE-Audio counts all rows, padding too)",
        )
        null_capacity: bool = Field(False, description="capacity also limits null-column picks (UniMoE-Audio's code)")
        renormalize_drops: bool = Field(
            False,
            description="after drops, rescale kept weights to the token's selected mass and gate shared experts over kept columns (UniMoE-Audio)",
        )
        dispatch: Literal["auto", "fused", "grouped_mm", "xformers", "gathered", "dense", "picked", "loop"] = Field(
            "auto",
            description="expert dispatch plan (auto: fused on CPU, grouped_mm on CUDA, dense, picked (CPU) or gathered for a no-grad decoding step, or the plan table's entry)",
        )
        plan_table: Optional[str] = Field(
            None, max_length=4096, description="JSON plan table written by `audiomoe bench moe MODEL --tune FILE`"
        )
        expert_parallel: int = Field(
            1,
            ge=1,
            le=4096,
            description="expert-parallel ranks N: each holds num_experts / N routed experts after expert_parallel.shard_experts (1 = off)",
        )

    def __init__(
        self, params: Params, *, d_model: int, router: Any, expert: Any, task_names: Optional[list[str]] = None
    ) -> None:
        super().__init__(params)
        p = self.params
        self.d_model = d_model
        self.num_experts, self.num_null, self.num_shared = p.num_experts, p.num_null, p.num_shared
        self.router = router(d_model=d_model, num_experts=p.num_experts + p.num_null, task_names=task_names)
        self.experts = build_experts(expert, p.num_experts, d_model)
        self.shared = build_experts(expert, p.num_shared, d_model, p.shared_d_ff) if p.num_shared else None
        self.shared_gate = (
            nn.Linear(d_model, p.num_shared, bias=False) if p.num_shared and p.shared_mode == "gated" else None
        )
        check_plan(p.dispatch, self.experts)
        check_divisible(p.num_experts, p.expert_parallel)
        self.ep_shard = None  # set by expert_parallel.shard_experts: this rank's block of experts and its groups
        self.dispatcher = Dispatcher(p.dispatch, load_plan_table(p.plan_table))
        self.last_stats: Mapping[str, Any] = {}

    @property
    def last_plan(self) -> Optional[str]:
        """The dispatch plan of the last forward."""
        return self.dispatcher.last_plan

    def forward(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Routing]:
        """Route and combine ``x`` [B, N, D] (or [N, D]); ``padding_mask`` True = padded. Returns ``(y, routing)``.

        ``task_ids``: [B] (one task per sequence, repeated over its tokens) or one per token, passed to the router.
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
        bad = routing_problems(routing, tokens.shape[0], self.num_experts + self.num_null)
        if bad:
            who = getattr(self.router, "audiomoe_component", None)
            name = f"'{who.name}' ({who.plugin} {who.version}) at '{who.path}'" if who else type(self.router).__name__
            raise AudioMoEError(
                f"router {name} broke the Routing contract: {'; '.join(bad)} (audiomoe.testing.check_component checks a router)"
            )
        routing.null_columns = self.num_null
        routing.item_shape = tuple(shape[:-1])
        if routing.item_mask is None:
            routing.item_mask = item_mask
        return self.combine(tokens, routing).reshape(shape), routing

    def combine(self, tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The layer output [N, D] for ``tokens`` [N, D] under a given routing (public: benchmarks and tests fix it)."""
        p = self.params
        n_cols = self.num_experts + self.num_null
        if routing.mask.shape != (tokens.shape[0], n_cols):
            raise AudioMoEError(
                f"routing mask has shape {tuple(routing.mask.shape)}, expected ({tokens.shape[0]}, {n_cols}) = (tokens, num_experts + num_null)"
            )
        item_mask = routing.item_mask
        mask = routing.mask if item_mask is None else routing.mask & item_mask[:, None]
        if p.capacity_factor is None and self.ep_shard is None:
            plan = self.dispatcher.plan_for(self.experts, tokens)
            if plan in ("dense", "picked"):
                return self._lean_step(tokens, routing, mask, item_mask, plan)
        n_valid = int(mask.shape[0] if item_mask is None else item_mask.sum())
        exp, tok, counts = sorted_pairs(mask, self.num_experts)
        weights, gate_mask, kept = routing.weights, mask, mask
        dropped, capacity = 0, None
        routing.dropped = None
        if p.capacity_factor is not None:
            capacity = capacity_of(
                int(mask.sum()) if p.capacity_basis == "pairs" else n_valid, n_cols, p.capacity_factor, p.min_capacity
            )
            scores = routing.logits.detach()[tok, exp] if p.drop_policy == "probs" else None
            exp, tok, counts, d_exp, d_tok = drop_over_capacity(exp, tok, counts, capacity, p.drop_policy, scores)
            if p.null_capacity and self.num_null:
                x_exp, x_tok = null_drops(mask, routing.logits, self.num_experts, capacity, p.drop_policy)
                d_exp, d_tok = torch.cat([d_exp, x_exp]), torch.cat([d_tok, x_tok])
            dropped = int(d_tok.numel())
            routing.dropped = torch.bincount(d_tok, minlength=mask.shape[0])
            if dropped:
                kept = mask.clone()
                kept[d_tok, d_exp] = False
                if p.renormalize_drops:
                    gate_mask, weights = kept, renormalize_after_drops(weights, mask, kept)
        weights, shared_w = self._gate_shared(tokens, routing, weights, gate_mask)
        self._record(routing, weights, kept, shared_w, tokens, item_mask)
        counts_list = counts.tolist()
        out = self._shared_output(tokens, item_mask, shared_w)
        if self.ep_shard is not None:  # every rank joins the all-to-all, with or without pairs of its own
            out = ep_combine(self, tokens, out, exp, tok, counts, weights[tok, exp])
        elif exp.numel():
            if p.expert_parallel > 1:
                warn_unsharded(self)
            out = self.dispatcher(tokens, out, exp, tok, counts_list, weights[tok, exp], self.experts)
        if out is None:
            out = tokens.new_zeros(tokens.shape)
        self.last_stats = {
            "tokens": n_valid,
            "routed_pairs": int(exp.numel()),
            "dropped_pairs": dropped,
            "capacity": -1 if capacity is None else capacity,
            "routed_per_token": exp.numel() / max(n_valid, 1),
            "expert_loads": counts_list,
        }
        return out

    def _lean_step(
        self, tokens: torch.Tensor, routing: Routing, mask: torch.Tensor, item_mask, plan: str
    ) -> torch.Tensor:
        """Dropless combine through the ``dense`` or ``picked`` plan: no pair is sorted, nothing read on the host
        but ``picked``'s picks (a decoding step's few ops); the statistics are computed only when read."""
        routing.dropped = None
        weights, shared_w = self._gate_shared(tokens, routing, routing.weights, mask)
        self._record(routing, weights, mask, shared_w, tokens, item_mask)
        e = self.num_experts
        # without null columns the routed part is the whole record: no slicing op
        routed, w_routed = (mask, weights) if mask.shape[1] == e else (mask[:, :e], weights[:, :e])
        if plan == "dense":
            out = self.experts.forward_all(tokens, w_routed * routed)
        else:
            out = self.experts.forward_picked(tokens, routed, w_routed)
        self.dispatcher.last_plan = plan
        shared = self._shared_output(tokens, item_mask, shared_w)
        self.last_stats = DenseStepStats(routed, item_mask)
        return out if shared is None else out + shared

    def _gate_shared(self, tokens: torch.Tensor, routing: Routing, weights: torch.Tensor, gate_mask: torch.Tensor):
        """``(routed weights, shared weights or None)``: gated mode splits the mass with the shared columns, else unchanged."""
        if self.shared_gate is None:
            return weights, None
        gate_in = routing.inputs if routing.inputs is not None and routing.inputs.shape == tokens.shape else tokens
        shared_logits = nn.functional.linear(gate_in, as_dtype(self.shared_gate.weight, gate_in.dtype))
        weights, shared_w = gate_shared(weights, routing.logits, gate_mask, shared_logits)
        return weights, as_dtype(shared_w, tokens.dtype)

    def _record(
        self, routing: Routing, weights: torch.Tensor, kept: torch.Tensor, shared_w, tokens: torch.Tensor, item_mask
    ) -> None:
        """Write what was applied onto the routing record (a dropped pair contributes nothing, renormalised or not)."""
        if isinstance(routing, LazyRouting) and not torch.is_grad_enabled():  # a decoding step: only if read
            routing.defer("applied", lambda: (weights * kept).detach())
        else:
            routing.applied = (weights * kept).detach()
        if self.num_shared:
            sw = tokens.new_ones(tokens.shape[0], self.num_shared) if shared_w is None else shared_w.detach()
            routing.shared_weights = sw if item_mask is None else sw * item_mask[:, None]

    def _shared_output(
        self, tokens: torch.Tensor, item_mask: Optional[torch.Tensor], shared_w: Optional[torch.Tensor]
    ) -> Optional[torch.Tensor]:
        """Shared experts' output [N, D] (None without shared experts); padded rows are zero."""
        if self.shared is None:
            return None
        if item_mask is None or bool(item_mask.all()):
            return self.shared.forward_all(tokens, shared_w)
        idx = item_mask.nonzero(as_tuple=True)[0]
        ys = self.shared.forward_all(
            tokens.index_select(0, idx), None if shared_w is None else shared_w.index_select(0, idx)
        )
        return tokens.new_zeros(tokens.shape).index_add_(0, idx, ys)

    def idle_children(self) -> list[str]:
        """Per-expert modules no token picked in the last forward (grouped experts are one tensor: none)."""
        loads = self.last_stats.get("expert_loads")
        if (
            loads is None or not isinstance(self.experts, LoopExperts) or self.ep_shard is not None
        ):  # EP: loads come from every rank
            return []
        return [f"experts.{e}" for e, n in enumerate(loads) if n == 0]

    def num_active_parameters(self) -> float:
        """Router + shared experts (+ gate) + the routed experts an average valid token used in the last forward.

        Before any forward: the router's ``k`` if it has one, else every routed expert (an upper bound).
        """
        count = lambda m: 0 if m is None else sum(q.numel() for q in m.parameters())
        fixed = count(self.router) + count(self.shared) + count(self.shared_gate)
        if "routed_per_token" in self.last_stats:
            k = self.last_stats["routed_per_token"]
        else:
            k = min(
                float(
                    getattr(self.router, "k", None)
                    or getattr(getattr(self.router, "params", None), "k", None)
                    or self.num_experts
                ),
                self.num_experts,
            )
        return fixed + self.experts.num_expert_parameters() * k


__all__ = ["MoELayer", "PLANS"]
