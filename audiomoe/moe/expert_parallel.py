"""Expert parallelism (EP) for the MoE layer over ``torch.distributed``: each rank of an EP group holds
``E / N`` routed experts (a contiguous block) and tokens travel to them and back by all-to-all.

Reference: UniMoE-Audio trained its 7.1 B MoE with EP 4 (two routed experts per device) on
DeepSpeed-MoE; torchtitan (``distributed/expert_parallel.py``) runs EP on plain torch.distributed with
the same two exchanges: per-expert counts first, then the token rows with variable splits
(``all_to_all_single``). Semantics kept exact against the single-process layer:

- the router, capacity drops, drop renormalisation and shared gating run locally on the rank's own
  tokens (as DeepSpeed-MoE's local capacity), so rank ``r``'s output equals the full layer's output on
  rank ``r``'s tokens; shared experts and null columns never leave the rank (null picks are not pairs);
- dispatch: rows sorted by global expert are already grouped by owning rank; the counts exchange gives
  the splits; received rows (source-major) are reordered expert-major for the local expert group (the
  layer's own dispatcher plan); outputs return by the inverse exchange and are weighted and added on
  the sending rank, so the router's gradient never crosses ranks;
- gradients flow back through :class:`AllToAll` (its backward is the inverse exchange). An expert's
  gradient is the sum over every rank's loss; :func:`reduce_expert_grads` turns it into the
  data-parallel mean (divide by N, average over expert replicas).

Layout: ``world = replicas x N``; EP groups are consecutive ranks ``[kN, (k+1)N)``, expert replicas are
ranks with the same ``rank % N`` (on the 2-D mesh of :mod:`audiomoe.train.mesh2d` they FSDP-shard the block
instead of replicating it). A layer built with ``expert_parallel: N`` holds every expert until
:func:`shard_experts` (so its init equals the one-process model's); unsharded it is the full layer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.moe.grouped import GroupedSwiGLU, LoopExperts

log = logging.getLogger("audiomoe.experts")
_GROUPS: dict[int, tuple] = {}


def check_divisible(num_experts: int, expert_parallel: int) -> None:
    """Refuse an EP size that does not divide the routed experts (named, with what to use)."""
    if num_experts % expert_parallel:
        ok = [n for n in range(1, num_experts + 1) if num_experts % n == 0]
        raise AudioMoEError(
            f"moe.expert_parallel={expert_parallel} does not divide moe.num_experts={num_experts}: each rank holds "
            f"num_experts / expert_parallel routed experts; use expert_parallel in {ok} or change num_experts"
        )


@dataclass
class CommStats:
    """What the all-to-all exchanges moved while :func:`record_comm` was active (forward and backward)."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_off_rank: int = 0  # what left this rank (rows kept on the rank are copied, not sent)
    seconds: float = 0.0
    per_call: list = field(default_factory=list)


_STATS: Optional[CommStats] = None


@contextlib.contextmanager
def record_comm() -> Iterator[CommStats]:
    """Count bytes and wall time of every EP exchange inside the block (benchmarks, tests)."""
    global _STATS
    prev, _STATS = _STATS, CommStats()
    try:
        yield _STATS
    finally:
        _STATS = prev


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """``all_to_all_single`` of rows ``x`` [sum(in_splits), ...] -> [sum(out_splits), ...]."""
    x = x.contiguous()
    y = x.new_empty((sum(out_splits), *x.shape[1:]))
    t0 = time.perf_counter() if _STATS is not None else 0.0
    dist.all_to_all_single(y, x, out_splits, in_splits, group=group)
    if _STATS is not None:
        row = math.prod(x.shape[1:]) * x.element_size()
        me = dist.get_rank(group)
        dt = time.perf_counter() - t0
        _STATS.calls += 1
        _STATS.bytes_sent += sum(in_splits) * row
        _STATS.bytes_off_rank += (sum(in_splits) - in_splits[me]) * row
        _STATS.seconds += dt
        _STATS.per_call.append((sum(in_splits) * row, dt))
    return y


class AllToAll(torch.autograd.Function):
    """Differentiable variable-split all-to-all: forward sends ``in_splits`` rows to each rank, backward the inverse."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):  # type: ignore[override]  # autograd.Function's own signature
        ctx.splits, ctx.group = (list(out_splits), list(in_splits)), group
        return _exchange(x, list(out_splits), list(in_splits), group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]  # autograd.Function's own signature
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


@dataclass
class ExpertShard:
    """Where a sharded layer's experts live: its EP group, expert-replica group, and its block ``[lo, hi)``."""

    group: object
    replica_group: object
    size: int
    rank: int
    lo: int
    hi: int
    num_experts: int

    @property
    def local(self) -> int:
        """Routed experts held on this rank."""
        return self.hi - self.lo

    def __deepcopy__(self, memo) -> "ExpertShard":
        return self  # a layout with process groups: a copied model shares it (groups cannot be copied)


def ep_combine(
    layer: nn.Module,
    tokens: torch.Tensor,
    base: Optional[torch.Tensor],
    exp: torch.Tensor,
    tok: torch.Tensor,
    counts: torch.Tensor,
    w_pairs: torch.Tensor,
) -> torch.Tensor:
    """``base + sum_p w_p expert_{e_p}(tokens[tok_p])`` [N, D] with the experts spread over the EP group.

    Collective: every rank of the group calls it once per layer forward, with or without pairs.
    """
    shard: ExpertShard = layer.ep_shard
    n, local = shard.size, shard.local
    send_counts = counts.to(torch.long).contiguous()  # [E]: pairs per global expert, grouped by owner
    recv_counts = _exchange(
        send_counts, [local] * n, [local] * n, shard.group
    )  # [N * L]: source rank, then local expert
    send_splits = send_counts.view(n, local).sum(1).tolist()
    recv_2d = recv_counts.view(n, local)
    recv_splits = recv_2d.sum(1).tolist()
    rx = AllToAll.apply(tokens.index_select(0, tok), recv_splits, send_splits, shard.group)
    # received rows are source-major: sort them expert-major (stable: by source, then token, within an expert)
    local_exp = torch.arange(local, device=rx.device).repeat(n).repeat_interleave(recv_counts.to(rx.device))
    perm = torch.argsort(local_exp, stable=True)
    wdt = next(layer.experts.parameters()).dtype  # FSDP may run the rest of the block in another dtype
    xin = rx.to(wdt)
    ones = xin.new_ones(perm.numel())
    args = (xin, None, local_exp[perm], perm, recv_2d.sum(0).tolist(), ones)
    # experts FSDP-sharded over data parallel (audiomoe.train.mesh2d): run through their FSDP forward method
    run = getattr(layer.experts, "ep_compute", None)
    ry = layer.dispatcher(*args, layer.experts) if run is None else run(layer.dispatcher, *args)
    ys = AllToAll.apply(ry.to(tokens.dtype), send_splits, recv_splits, shard.group)
    out = tokens.new_zeros(tokens.shape) if base is None else base.clone()
    return out.index_add_(0, tok, ys * w_pairs.to(ys.dtype).unsqueeze(-1))


def warn_unsharded(layer: nn.Module) -> None:
    """Log once when a layer configured for EP runs unsharded inside a multi-rank job (correct, but every rank holds all experts)."""
    if (
        getattr(layer, "_ep_warned", False)
        or not (dist.is_available() and dist.is_initialized())
        or dist.get_world_size() == 1
    ):
        return
    layer._ep_warned = True
    log.warning(
        "MoE layer with expert_parallel=%d runs unsharded on %d ranks (every rank holds all experts); "
        "call audiomoe.moe.expert_parallel.shard_experts(model) after init_process_group",
        layer.params.expert_parallel,
        dist.get_world_size(),
    )


def ep_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every MoE layer in ``model`` configured with ``expert_parallel > 1``."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if hasattr(m, "ep_shard") and getattr(m.params, "expert_parallel", 1) > 1
    ]


def expert_groups(expert_parallel: int) -> tuple[object, object]:
    """``(ep_group, replica_group)`` of this rank for EP size N (consecutive ranks form an EP group); cached.

    Collective on first use for a given N: every rank must call it (``shard_experts`` does).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise AudioMoEError(
            f"expert_parallel={expert_parallel} needs torch.distributed: start with torchrun "
            f"(--nproc_per_node {expert_parallel}) and call torch.distributed.init_process_group first"
        )
    world = dist.get_world_size()
    if world % expert_parallel:
        raise AudioMoEError(
            f"world size {world} is not a multiple of moe.expert_parallel={expert_parallel}: launch "
            f"expert_parallel x data_parallel processes (e.g. torchrun --nproc_per_node {expert_parallel})"
        )
    cached = _GROUPS.get(expert_parallel)
    if cached is None or cached[0] is not dist.group.WORLD:  # a new process group invalidates the old subgroups
        ep, _ = dist.new_subgroups_by_enumeration(
            [list(range(k, k + expert_parallel)) for k in range(0, world, expert_parallel)]
        )
        rep, _ = dist.new_subgroups_by_enumeration(
            [list(range(i, world, expert_parallel)) for i in range(expert_parallel)]
        )
        cached = _GROUPS[expert_parallel] = (dist.group.WORLD, ep, rep)
    return cached[1], cached[2]


def _slice(experts: nn.Module, lo: int, hi: int) -> nn.Module:
    """Keep experts ``[lo, hi)`` of a group (stacked weights sliced in place, a loop group cut)."""
    if isinstance(experts, GroupedSwiGLU):
        for name in ("gate_up_proj", "down_proj"):
            old = getattr(experts, name)
            setattr(experts, name, nn.Parameter(old.detach()[lo:hi].clone(), requires_grad=old.requires_grad))
        experts.num_experts = hi - lo
        return experts
    if isinstance(experts, LoopExperts):
        return LoopExperts(list(experts)[lo:hi])
    raise AudioMoEError(
        f"expert group {type(experts).__name__} cannot be sharded for expert parallelism; use expert kind 'swiglu' or a per-expert kind"
    )


def shard_experts(model: nn.Module, group=None, replica_group=None) -> list[str]:
    """Keep on this rank only its block of routed experts in every ``expert_parallel > 1`` layer of ``model``.

    Call after ``init_process_group`` and before building the optimizer, DDP or FSDP. ``group``: the EP
    group (default: consecutive ranks, see :func:`expert_groups`); ``replica_group``: ranks holding the
    same experts (default with ``group=None``: derived; with an explicit group, None = no replicas).
    Returns the names of the expert parameters now sharded (DDP must ignore them).
    """
    names: list[str] = []
    for name, layer in ep_layers(model):
        n = layer.params.expert_parallel
        if layer.ep_shard is not None:
            if layer.ep_shard.size != n:
                raise AudioMoEError(f"{name} is already sharded over {layer.ep_shard.size} ranks, not {n}")
        else:
            if group is None:
                g, rep = expert_groups(n)
            else:
                g, rep = group, replica_group
                size, world = dist.get_world_size(g), dist.get_world_size()
                if size != n:
                    raise AudioMoEError(
                        f"{name or 'the MoE layer'}: moe.expert_parallel={n} but the EP group given has {size} ranks; make them equal"
                    )
                if world != n * (1 if rep is None else dist.get_world_size(rep)):
                    raise AudioMoEError(
                        f"world size {world} != expert_parallel {n} x expert replicas; pass replica_group, or group=None"
                    )
            r = dist.get_rank(g)
            per = layer.num_experts // n
            layer.experts = _slice(layer.experts, r * per, (r + 1) * per)
            layer.ep_shard = ExpertShard(g, rep, n, r, r * per, (r + 1) * per, layer.num_experts)
        names += [f"{name}.experts.{k}" if name else f"experts.{k}" for k, _ in layer.experts.named_parameters()]
    return names


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, ExpertShard]]:
    """``(name, parameter, shard)`` of every sharded expert parameter in ``model``."""
    out = []
    for name, layer in ep_layers(model):
        if layer.ep_shard is not None:
            out += [(f"{name}.experts.{k}".lstrip("."), p, layer.ep_shard) for k, p in layer.experts.named_parameters()]
    return out


def ignore_experts_in_ddp(model: nn.Module) -> list[str]:
    """Tell DDP (before wrapping) not to broadcast or all-reduce the sharded experts; returns their names."""
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, _, _ in expert_parameters(model)]
    # DDP's documented hook for model-parallel parameters (each rank holds different experts)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


@torch.no_grad()
def reduce_expert_grads(model: nn.Module) -> None:
    """Make sharded expert gradients the data-parallel mean: divide by the EP size, average over replicas.

    Call once per optimizer step, after the (last micro-batch's) backward and before clipping and
    ``optimizer.step()``: DDP averages the other parameters over all ranks; an expert's raw gradient is
    the sum of its EP group's losses, so ``/ N`` (and the replica mean) gives the same mean.
    """
    from torch.distributed.tensor import DTensor

    for _, p, shard in expert_parameters(model):
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):  # FSDP-sharded over the replicas (2-D mesh): its reduce-scatter took the mean
            p.grad.div_(shard.size)
            continue
        if shard.replica_group is not None and dist.get_world_size(shard.replica_group) > 1:
            dist.all_reduce(p.grad, group=shard.replica_group)
            p.grad.div_(dist.get_world_size(shard.replica_group))
        p.grad.div_(shard.size)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip all gradients by their global norm over EP (and FSDP) shards; returns that norm.

    Same rule as ``torch.nn.utils.clip_grad_norm_`` (scale ``max_norm / (norm + 1e-6)`` when below 1):
    replicated gradients count once, sharded experts are summed over their EP group, FSDP DTensor
    gradients over their mesh. Every rank calls it (collective).
    """
    from torch.distributed.tensor import DTensor

    experts = {id(p): shard for _, p, shard in expert_parameters(model)}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    plain = [
        g.detach().double().square().sum()
        for p in model.parameters()
        if (g := p.grad) is not None and id(p) not in experts and not isinstance(g, DTensor)
    ]
    sq = torch.stack(plain).sum().cpu() if plain else torch.zeros((), dtype=torch.float64)
    dts = [g for p in model.parameters() if isinstance(g := p.grad, DTensor) and id(p) not in experts]
    if dts:  # FSDP shards: DTensor's norm reduces over the mesh
        sq = sq + torch.nn.utils.get_total_norm(dts).full_tensor().double().cpu().square()
    groups: dict[tuple, tuple[object, object, list[torch.Tensor]]] = {}
    for _, p, shard in expert_parameters(model):  # a missing gradient counts as zero: every rank joins the reduce
        g = p.grad
        local = g.to_local() if isinstance(g, DTensor) else g  # 2-D mesh: this rank's dp chunk of its EP block
        part = (
            torch.zeros((), dtype=torch.float64, device=p.device)
            if local is None
            else local.detach().double().square().sum()
        )
        dp = p.device_mesh.get_group() if isinstance(p, DTensor) else None
        groups.setdefault((id(shard.group), id(dp)), (shard.group, dp, []))[2].append(part)
    for group, dp, parts in groups.values():  # each EP rank holds different experts: sum over the group
        part = torch.stack(parts).sum()
        dist.all_reduce(part, group=group)
        if dp is not None:  # and each dp rank a different chunk of them
            dist.all_reduce(part, group=dp)
        sq = sq + part.cpu()
    total = sq.sqrt()
    coef = float((max_norm / (total + 1e-6)).clamp(max=1.0))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total.float()
