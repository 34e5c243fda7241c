"""Full (one-process) state dicts of a sharded model, and loading them back at any layout.

A model laid out with expert parallelism (:mod:`audiomoe.moe.expert_parallel`) and / or FSDP2
(:mod:`audiomoe.train.fsdp`) holds on each rank only its experts' blocks and its FSDP shards. A
checkpoint must not depend on that: :func:`full_state_dict` / :func:`full_optimizer_state_dict`
gather the tensors of the same model built in one process (collective; rank 0 keeps them), and
:func:`load_full_state_dict` / :func:`load_full_optimizer_state_dict` slice such a state for this
rank's EP block and FSDP shard (every rank reads the whole file; no collective). So a checkpoint
written at one layout loads in one process, at another EP size or under FSDP.
:func:`save_full_safetensors` / :func:`load_full_safetensors` do the same through one safetensors file.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.moe.expert_parallel import ep_layers, expert_parameters
from audiomoe.moe.grouped import GroupedSwiGLU


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


@torch.no_grad()
def full_state_dict(model: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The one-process state dict of ``model`` as full CPU tensors: EP experts gathered, FSDP shards unsharded.

    Collective when the model is sharded (every rank calls it). Keys and shapes are those of the same
    model built without ``expert_parallel``/FSDP, so ``model.load_state_dict`` in one process takes it.
    ``rank0_only``: other ranks get ``{}`` (they still join the gathers).
    """
    from torch.distributed.tensor import DTensor

    sharded = {
        (f"{n}.experts." if n else "experts."): layer for n, layer in ep_layers(model) if layer.ep_shard is not None
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        pre = next((p for p in sharded if key.startswith(p)), None)
        if pre is None:
            out[key] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
            continue
        shard, rest = sharded[pre].ep_shard, key[len(pre) :]
        block = value.full_tensor() if isinstance(value, DTensor) else value  # 2-D mesh: unshard over dp first
        parts = [p.cpu() for p in _gather(block.detach(), shard.group)]
        if isinstance(sharded[pre].experts, GroupedSwiGLU):
            out[key] = torch.cat(parts)  # stacked [E/N, ...] blocks -> [E, ...]
        else:  # one module per expert: local index i on EP rank r is expert r * E/N + i
            i, tail = rest.split(".", 1)
            for r, t in enumerate(parts):
                out[f"{pre}{r * shard.local + int(i)}.{tail}"] = t
    if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return out


def save_full_safetensors(
    model: nn.Module, path: Union[str, os.PathLike], metadata: Optional[dict[str, str]] = None
) -> None:
    """Gather ``model`` (:func:`full_state_dict`) and write it as one safetensors file from rank 0 (no pickle).

    Collective. Written to a temporary name and renamed, so a reader never sees half a file.
    """
    from safetensors.torch import save_file

    state = full_state_dict(model, rank0_only=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        seen: set[int] = set()
        tensors = {}
        for k, v in state.items():  # safetensors refuses shared storage (tied weights): copy repeats
            ptr = v.untyped_storage().data_ptr()
            tensors[k] = v.contiguous().clone() if ptr in seen else v.contiguous()
            seen.add(ptr)
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata={"format": "audiomoe-full", **(metadata or {})})
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # safetensors writes 0600: give it the permissions of any file the user creates
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load a full (one-process) state dict into ``model`` at its layout: EP blocks sliced, FSDP shards distributed.

    Every rank passes the full dict (each reads the file); no collective is needed.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = {
        (f"{n}.experts." if n else "experts."): layer for n, layer in ep_layers(model) if layer.ep_shard is not None
    }
    local: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, value in model.state_dict().items():
        pre = next((p for p in sharded if key.startswith(p)), None)
        if pre is not None:
            shard, rest = sharded[pre].ep_shard, key[len(pre) :]
            if isinstance(sharded[pre].experts, GroupedSwiGLU):
                src = key
            else:
                i, tail = rest.split(".", 1)
                src = f"{pre}{shard.lo + int(i)}.{tail}"
            if src not in state:
                continue
            full = state[src]
            if isinstance(sharded[pre].experts, GroupedSwiGLU):
                if full.shape[0] != shard.num_experts:
                    raise AudioMoEError(
                        f"'{src}' holds {full.shape[0]} experts, the model {shard.num_experts}; load a checkpoint of the same num_experts"
                    )
                full = full[shard.lo : shard.hi]
            if isinstance(value, DTensor):  # 2-D mesh: the block FSDP-sharded over dp, sliced locally
                full = distribute_tensor(
                    full.to(device=value.device, dtype=value.dtype),
                    value.device_mesh,
                    value.placements,
                    src_data_rank=None,
                )
            local[key] = full
            used.add(src)
        elif key in state:
            full = state[key]
            if isinstance(value, DTensor):  # every rank holds the full tensor: slice locally, no scatter
                full = distribute_tensor(
                    full.to(device=value.device, dtype=value.dtype),
                    value.device_mesh,
                    value.placements,
                    src_data_rank=None,
                )
            local[key] = full
            used.add(key)
    if strict:
        missing = sorted(set(model.state_dict()) - set(local))
        extra = sorted(k for k in state if k not in used and not any(k.startswith(p) for p in sharded))
        if missing or extra:
            raise AudioMoEError(
                f"state dict does not match the model: missing {missing[:5]}, unexpected {extra[:5]}; build the model from the checkpoint's spec"
            )
    meta = any(p.is_meta for p in model.parameters())
    if meta:  # a model built on the meta device takes the tensors as they are: own copies, not views of the full ones
        local = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in local.items()}
    model.load_state_dict(local, strict=strict, assign=meta)


def load_full_safetensors(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> None:
    """Read a full safetensors checkpoint (no pickle) and load it at ``model``'s layout (:func:`load_full_state_dict`)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise AudioMoEError(f"checkpoint '{path}' does not exist; write one with save_full_safetensors(model, path)")
    load_full_state_dict(model, load_file(os.fspath(path)), strict=strict)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]  # the order of state_dict()'s indices


def _expert_blocks(model: nn.Module) -> dict[int, Any]:
    """``id(param) -> shard`` for sharded stacked experts; per-expert (loop) shards cannot map one to one."""
    out = {}
    for name, p, shard in expert_parameters(model):
        if not name.endswith(("gate_up_proj", "down_proj")):
            raise AudioMoEError(
                f"optimizer state of '{name}' (a per-expert module under expert parallelism) cannot be gathered; use expert kind 'swiglu'"
            )
        out[id(p)] = shard
    return out


@torch.no_grad()
def full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, rank0_only: bool = False
) -> dict[str, Any]:
    """``optimizer.state_dict()`` with one-process tensors: expert moments gathered, FSDP shards unsharded. Collective."""
    from torch.distributed.tensor import DTensor

    experts, live = _expert_blocks(model), optimizer.state_dict()
    state = {
        "param_groups": live["param_groups"],
        "state": {},
    }  # state_dict() shares the live per-parameter dicts: copy
    for idx, p in enumerate(_optimizer_params(optimizer)):
        if id(p) in experts:  # every rank of the EP group must join the gather, or none
            has = torch.tensor([1 if idx in live["state"] else 0], device=p.device)
            dist.all_reduce(has, group=experts[id(p)].group)
            if 0 < int(has) < experts[id(p)].size:
                raise AudioMoEError(
                    f"optimizer state of expert parameter {idx} exists on only {int(has)} of {experts[id(p)].size} EP ranks; save after a full step"
                )
        if idx not in live["state"]:
            continue
        entry = state["state"][idx] = {}
        for key, v in live["state"][idx].items():
            if isinstance(v, DTensor):
                v = v.full_tensor()  # an expert's (2-D mesh): its EP block, gathered over ep below
            if id(p) in experts and torch.is_tensor(v) and v.dim() and v.shape == p.shape:
                v = torch.cat(_gather(v, experts[id(p)].group))
            entry[key] = v.detach().cpu().clone() if torch.is_tensor(v) else v
    if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return state


def _read_local(v: Any, p: torch.Tensor, block: Any) -> torch.Tensor:
    """This rank's part of a stored one-process optimizer tensor ``v`` of parameter ``p``: its expert block's rows
    (``block``: the EP shard), then its FSDP dim-0 chunk as a DTensor laid out as ``p``; all of it otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    lo, shape = 0, tuple(v.shape)
    if block is not None and v.dim() and shape[0] == block.num_experts and shape[1:] == tuple(p.shape[1:]):
        lo, shape = block.lo, (block.hi - block.lo, *shape[1:])
    if not (isinstance(p, DTensor) and v.dim() and shape == tuple(p.shape)):
        return v.read((lo, lo + shape[0]) if v.dim() else None)
    size, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(size[1:]) != shape[1:]:  # sharded on another dimension: the full rows, cut by distribute_tensor
        full = v.read((lo, lo + shape[0])).to(p.device)
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
    rows = v.read((lo + offset[0], lo + offset[0] + size[0]))
    return DTensor.from_local(
        rows.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


@torch.no_grad()
def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a one-process optimizer state (:func:`full_optimizer_state_dict`) at ``model``'s layout (no collective).

    Its tensors may be :class:`~audiomoe.train.meta_shards.StoredTensor` (``load_trainer_state(...,
    lazy_optimizer=True)``): then only this rank's rows are read (:func:`_read_local`), never a full tensor.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    experts = _expert_blocks(model)
    params = _optimizer_params(optimizer)
    local = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        out = {}
        for key, v in entry.items():
            if hasattr(v, "read"):  # a StoredTensor
                out[key] = _read_local(v, p, experts.get(id(p)))
                continue
            if (
                torch.is_tensor(v)
                and id(p) in experts
                and v.dim()
                and v.shape[0] == experts[id(p)].num_experts
                and v.shape[1:] == p.shape[1:]
            ):
                v = v[experts[id(p)].lo : experts[id(p)].hi]
            if torch.is_tensor(v) and isinstance(p, DTensor) and v.dim() and v.shape == p.shape:
                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            out[key] = v
        local["state"][idx] = out
    optimizer.load_state_dict(local)


__all__ = [
    "full_optimizer_state_dict",
    "full_state_dict",
    "load_full_optimizer_state_dict",
    "load_full_safetensors",
    "load_full_state_dict",
    "save_full_safetensors",
]
