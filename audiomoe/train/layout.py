"""A run's process layout from the recipe's ``distributed:``: DDP, expert parallelism (EP) and FSDP2.

``distributed: {data_parallel: D, expert_parallel: N, fsdp: true}`` on ``world`` processes
(``audiomoe train RECIPE --nproc W`` or ``torchrun --nproc-per-node W -m audiomoe train RECIPE``):

- ``world = D x N``: EP groups are ``N`` consecutive ranks holding ``num_experts / N`` routed experts
  each, and ``D`` groups replicate them (``D`` defaults to ``world / N``; given, it is checked). Every
  rank still reads its own share of the batch (``batch_size`` is split over all ``world`` ranks);
- ``expert_parallel: N`` builds the model with ``backbone.moe.expert_parallel=N`` (the spec recorded
  in checkpoints and ``run.json`` stays the one given, so a checkpoint is layout-free: it loads in one
  process and resumes at any EP size); a model without a ``backbone.moe`` block, or one whose spec
  already fixes another ``expert_parallel``, is refused. Unset, N is the spec's own (default 1);
- ``fsdp: true`` shards every Transformer block, the encoder and the root with FSDP2
  (``param_dtype`` / ``reduce_dtype``: ``bf16`` | ``fp32`` | null = the parameters' own). With EP and
  ``D > 1`` it is the 2-D ``(dp, ep)`` mesh (:mod:`audiomoe.train.mesh2d`): each EP block is itself
  FSDP-sharded over its ``D`` replicas instead of replicated.

With EP or FSDP (:attr:`Layout.sharded`) the trainer calls :meth:`Layout.prepare` once (after the
first stage's init, before its optimizer), :meth:`Layout.wrap` per stage (DDP with the experts
ignored, or the FSDP model itself), :meth:`Layout.clip` per optimizer step (expert gradients
reduced, the global norm over shards); the checkpointer gathers full state dicts for every checkpoint
(collective; rank 0 writes, :mod:`.checkpointer` and :mod:`.fullstate`). Plain DDP is unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.train.optim import clip_and_norm

_CMD = "audiomoe train RECIPE --nproc {n} (or torchrun --nproc-per-node {n} -m audiomoe train RECIPE)"


def moe_params(spec: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The params of the spec's ``backbone.moe`` block (resolved spec), or None when it has none."""
    backbone = spec.get("backbone") or {}
    moe = (backbone.get("params") or {}).get("moe") if isinstance(backbone, dict) else None
    return moe.get("params") if isinstance(moe, dict) and isinstance(moe.get("params"), dict) else None


@dataclass
class Layout:
    """How the model is laid out over ``world`` processes (see the module doc)."""

    world: int = 1
    expert_parallel: int = 1
    fsdp: bool = False
    param_dtype: Optional[str] = None
    reduce_dtype: Optional[str] = None
    reshard_after_forward: bool = True
    prepared: bool = False
    meta_init: bool = False

    @property
    def sharded(self) -> bool:
        """EP or FSDP: forwards, evaluations and checkpoints are collective (every rank takes part)."""
        return self.expert_parallel > 1 or self.fsdp

    @property
    def data_parallel(self) -> int:
        """Replicas of each EP group (``world / expert_parallel``)."""
        return self.world // self.expert_parallel

    @property
    def mesh_2d(self) -> bool:
        """EP and FSDP with data replicas: the ``(dp, ep)`` mesh, each expert block FSDP-sharded over its replicas."""
        return self.fsdp and self.expert_parallel > 1 and self.data_parallel > 1

    def describe(self) -> dict[str, Any]:
        """The layout for the run summary."""
        return {
            "world": self.world,
            "data_parallel": self.data_parallel,
            "expert_parallel": self.expert_parallel,
            "fsdp": self.fsdp,
        }

    def build_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``spec`` with ``backbone.moe.expert_parallel`` set to this layout's (the spec a rank builds)."""
        if self.expert_parallel == 1:
            return spec
        out = copy.deepcopy(spec)
        moe_params(out)["expert_parallel"] = self.expert_parallel  # type: ignore[index]  # a dict by construction
        return out

    # -- per run / stage / step ----------------------------------------------------------------

    def prepare(self, model: torch.nn.Module) -> None:
        """Shard the experts over their EP groups, then FSDP2 (once; before any optimizer is built)."""
        if self.prepared or not self.sharded:
            return
        from audiomoe.train import fsdp as parallel

        if self.mesh_2d:  # experts EP x FSDP(dp), the rest FSDP over every rank (audiomoe.train.mesh2d)
            from audiomoe.train.mesh2d import apply_2d

            apply_2d(
                model,
                self.expert_parallel,
                param_dtype=self.param_dtype,
                reduce_dtype=self.reduce_dtype,
                reshard_after_forward=self.reshard_after_forward,
            )
            self.prepared = True
            return
        if self.expert_parallel > 1:
            parallel.shard_experts(model)
        if self.fsdp:
            parallel.apply_fsdp(
                model,
                param_dtype=self.param_dtype,
                reduce_dtype=self.reduce_dtype,
                reshard_after_forward=self.reshard_after_forward,
            )
        self.prepared = True

    def build_sharded(
        self, resolved: Any, device: torch.device, checkpoint: Optional[str] = None
    ) -> Optional[torch.nn.Module]:
        """The model built on ``meta``, sharded (:meth:`prepare`), then given only this rank's shards; None when
        this layout builds on CPU (unsharded, or ``meta_init: false``).

        ``resolved``: the spec a rank builds (:meth:`build_spec`). ``checkpoint``: a full safetensors file to
        read this rank's rows from (resuming); None: the seeded init, equal to :func:`build_model`'s
        (:mod:`audiomoe.train.meta_init`).
        """
        if not (self.sharded and self.meta_init):
            return None
        from audiomoe.core.composer import build_meta
        from audiomoe.train.meta_init import load_shards, materialize, record_build

        if checkpoint is None:
            model, program = record_build(resolved)
        else:
            model, program = build_meta(resolved), None
        self.prepare(model)
        if program is None:
            load_shards(model, checkpoint, device)
        else:
            materialize(model, program, device)
        return model

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """What the step loop calls: the model (one process, FSDP) or a DDP of it (rebuilt each stage: its trainable set)."""
        if self.world == 1 or self.fsdp:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        from audiomoe.core.interfaces import Router

        ids = [device] if device.type == "cuda" else None
        if self.expert_parallel > 1:
            from audiomoe.train.fsdp import ignore_experts_in_ddp

            ignore_experts_in_ddp(model)  # each rank holds other experts: DDP must neither broadcast nor average them
            return DDP(model, device_ids=ids, find_unused_parameters=True)
        # routed experts (or weak encoders) a rank's batch never picks get no gradient there:
        # DDP must then look for unused tensors; a model without routers has a static graph
        routed = any(isinstance(m, Router) for m in model.modules())
        return DDP(model, device_ids=ids, find_unused_parameters=routed)

    def clip(self, model: torch.nn.Module, params: list[torch.nn.Parameter], max_norm: Optional[float]) -> float:
        """After the last micro-batch's backward: expert gradients reduced, global norm (clipped when ``max_norm``)."""
        if not self.sharded:
            return clip_and_norm(params, max_norm)
        from audiomoe.train import fsdp as parallel

        for _, p, _ in parallel.expert_parameters(model):
            if p.requires_grad and p.grad is None:
                # a block no token reached on this rank: in one process the stacked tensor gets a zero
                # gradient (AdamW still decays and moves it); the same here, and every EP rank keeps state
                p.grad = torch.zeros_like(p)
        parallel.reduce_expert_grads(model)
        return float(parallel.clip_grad_norm_(model, float("inf") if max_norm is None else max_norm))

    def on_full_model(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """Run ``fn`` (a stage's init) on the full model: directly before sharding, else on a gathered copy.

        A later stage's init (``from_checkpoint``, ``from_specialists``) expects every expert and full
        tensors: every rank gathers the model (collective), builds it unsharded, runs ``fn`` alike, and
        loads the result back at its layout. Costs one full copy per rank for the moment of the init.
        """
        if not self.prepared:
            return fn(model)
        from audiomoe.core.composer import build_model, resolve
        from audiomoe.train.fullstate import full_state_dict, load_full_state_dict

        device = next(model.parameters()).device
        plain = build_model(resolve(model.spec))  # model.spec is layout-free: the one-process model
        plain.load_state_dict(full_state_dict(model))
        result = fn(plain.to(device))
        load_full_state_dict(model, plain.state_dict(), strict=True)
        return result


def plan_layout(section: Any, spec: dict[str, Any], world: int) -> Layout:
    """The :class:`Layout` of ``distributed:`` ``section`` for a model of resolved ``spec`` on ``world`` processes.

    Raises :class:`AudioMoEError` naming the fix when the layout cannot run: no MoE layer to shard, a
    spec that fixes another EP size, ``expert_parallel`` not dividing ``num_experts`` or the world size,
    ``data_parallel x expert_parallel != world``, or EP / FSDP in one process (not under torchrun).
    """
    moe = moe_params(spec)
    own = int(moe.get("expert_parallel", 1)) if moe else 1
    asked = section.expert_parallel
    if asked is not None and asked > 1 and moe is None:
        raise AudioMoEError(
            f"distributed.expert_parallel={asked}: this model has no MoE layer (backbone.moe) whose experts could be "
            "spread over ranks; remove distributed.expert_parallel (or use distributed.fsdp to shard a dense model)"
        )
    if asked is not None and own > 1 and asked != own:
        raise AudioMoEError(
            f"distributed.expert_parallel={asked} but the model spec sets backbone.moe.expert_parallel={own}; "
            "make them equal, or drop the model override and give the layout in distributed: only"
        )
    ep = asked if asked is not None else own
    if moe is not None and ep > 1 and int(moe["num_experts"]) % ep:
        n = int(moe["num_experts"])
        ok = [k for k in range(1, n + 1) if n % k == 0]
        raise AudioMoEError(
            f"distributed.expert_parallel={ep} does not divide backbone.moe.num_experts={n}: each rank holds "
            f"num_experts / expert_parallel routed experts; use expert_parallel in {ok}"
        )
    need = ep * (section.data_parallel or 1)
    what = " and ".join(
        [f"expert_parallel={ep}"] * (ep > 1)
        + ["fsdp"] * bool(section.fsdp)
        + [f"data_parallel={section.data_parallel}"] * bool(section.data_parallel)
    )
    if world == 1 and (ep > 1 or section.fsdp or (section.data_parallel or 1) > 1):
        n = max(need, 2)
        raise AudioMoEError(
            f"distributed: {what} needs several processes, but this is one process (not under torchrun); "
            f"run {_CMD.format(n=n)}"
        )
    if world % ep:
        raise AudioMoEError(
            f"world size {world} is not a multiple of distributed.expert_parallel={ep}: launch data_parallel x "
            f"expert_parallel processes, e.g. {_CMD.format(n=ep)}"
        )
    if section.data_parallel is not None and section.data_parallel * ep != world:
        raise AudioMoEError(
            f"distributed.data_parallel={section.data_parallel} x expert_parallel={ep} = {need} processes, but "
            f"{world} were started; run {_CMD.format(n=need)}, or leave data_parallel unset (= world / expert_parallel)"
        )
    return Layout(
        world,
        ep,
        bool(section.fsdp),
        section.param_dtype,
        section.reduce_dtype,
        section.reshard_after_forward,
        meta_init=bool(getattr(section, "meta_init", False)),
    )


def check_batch(batch_size: int, world: int) -> None:
    """The global batch must split evenly over the ``world`` ranks (each reads ``batch_size / world`` items)."""
    if batch_size % world:
        ok = [b for b in (batch_size - batch_size % world, batch_size - batch_size % world + world) if b > 0]
        raise AudioMoEError(
            f"batch_size {batch_size} must be a multiple of the number of processes ({world}); "
            f"it is the global batch (e.g. {' or '.join(map(str, ok))})"
        )


def check_recipe(recipe: Any, world: int) -> Layout:
    """What each of ``world`` ranks checks of ``recipe`` before it trains, done once without a process group.

    The model spec resolves; the ``distributed:`` layout fits it and ``world`` (:func:`plan_layout`); the
    global batch splits over the ranks; the model builds on the meta device (constructor checks, size and
    memory limits, no weights), and at that layout its experts can be cut into blocks; the data choice exists.
    Raises the :class:`AudioMoEError` the ranks would raise.
    """
    from audiomoe.core.composer import build_meta, check_size, resolve
    from audiomoe.train.data import resolve_choice
    from audiomoe.train.trainer import memory_check

    resolved = recipe.model.resolve()
    layout = plan_layout(recipe.distributed, resolved.to_dict(), world)
    check_batch(recipe.batch_size, world)
    meta = build_meta(resolved)
    memory_check(check_size(meta))
    if layout.expert_parallel > 1:  # each rank cuts its experts with this code: a kind it cannot cut fails here
        from audiomoe.moe.expert_parallel import _slice, ep_layers

        for _, layer in ep_layers(build_meta(resolve(layout.build_spec(resolved.to_dict())))):
            _slice(layer.experts, 0, layer.num_experts // layer.params.expert_parallel)
    resolve_choice(meta, recipe.data)
    return layout
