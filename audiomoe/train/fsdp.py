"""Running large models: FSDP2 for the backbone and encoders, expert parallelism for the MoE layers, and
full-tensor safetensors checkpoints that load at any layout (one process, another EP size, FSDP).

References: torchtitan trains MoE models with FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per
Transformer block, then the root; ``MixedPrecisionPolicy`` for bf16 params / fp32 reduce) plus expert
parallelism on the same ranks; UniMoE-Audio trained with EP 4 on DeepSpeed-MoE. The EP layer itself is
:mod:`audiomoe.moe.expert_parallel` (re-exported here so a trainer imports one module).

Layouts:

- DDP + EP: ``shard_experts(model)``, ``ignore_experts_in_ddp(model)``, ``DistributedDataParallel(model)``;
  per step ``backward``, ``reduce_expert_grads(model)``, ``clip_grad_norm_(model, c)``, ``step``.
- FSDP2 (+ EP): ``shard_experts(model)`` then ``apply_fsdp(model, param_dtype=..., reduce_dtype=...)``; the
  expert shards are left out of FSDP (``ignored_params``) and reduced by ``reduce_expert_grads``.
- Checkpoints: ``save_full_safetensors(model, path)`` (collective; rank 0 writes each expert once as
  full tensors, the keys and shapes of the one-process model) and ``load_full_safetensors(model, path)``
  (slices experts for this rank's EP block and parameters for its FSDP shard).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.moe.expert_parallel import (  # re-exported (__all__): the trainer imports one module
    clip_grad_norm_,
    ep_layers,
    expert_groups,
    expert_parameters,
    ignore_experts_in_ddp,
    reduce_expert_grads,
    shard_experts,
)
from audiomoe.moe.grouped import GroupedSwiGLU

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}  # fmt: skip
UNIT_LISTS = ("blocks", "layers")  # ModuleLists whose children are Transformer blocks (audiomoe, transformers)


def _dtype(value: Union[None, str, torch.dtype], key: str) -> Optional[torch.dtype]:
    """A dtype from a config string (``bf16``, ``float32``, ...) or a ``torch.dtype``; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise AudioMoEError(f"fsdp {key}={value!r} is not a dtype; use one of {', '.join(sorted(_DTYPES))} or null (keep the parameters' dtype)")
    return _DTYPES[value]


def _require_dist(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise AudioMoEError(f"{what} needs torch.distributed: start with torchrun and call torch.distributed.init_process_group first")


def _callable_block(m: nn.Module) -> bool:
    """A module with children and a forward of its own (not a container, not a bare layer)."""
    return bool(list(m.children())) and not isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict))


def default_units(model: nn.Module) -> list[str]:
    """FSDP units: each Transformer block (children of ``blocks`` / ``layers`` lists) and the ``encoder``.

    A unit must be *called* on every rank at every step. So modules under a mixture's ``weak`` list are
    skipped (they run only for the samples that select them: a rank that skips one would leave the
    others waiting in its all-gather; they stay in their parent's unit, whose unused parameters get
    zero gradients), and so are lists inside routers and lists of bare layers (a router's scorer reads
    ``layer.weight`` without calling the layer, which FSDP's hooks would never see).
    """
    from audiomoe.core.interfaces import Router

    inside_router = {n for n, m in model.named_modules() if isinstance(m, Router)}
    units = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if "weak" in parts or any(name == r or name.startswith(r + ".") for r in inside_router):
            continue
        if isinstance(module, nn.ModuleList) and parts[-1] in UNIT_LISTS and all(_callable_block(c) for c in module):
            units += [f"{name}.{i}" for i in range(len(module))]
    if isinstance(getattr(model, "encoder", None), nn.Module):
        units.append("encoder")
    return units


class _TouchParams(torch.autograd.Function):
    """Identity on ``x`` whose backward gives every listed parameter a zero gradient.

    FSDP2 reduce-scatters only the parameters that got a gradient, so a data-dependent skip (a head
    no sample of this rank needed, an idle expert, a weak encoder) would make ranks disagree on the
    collective; zeros keep them in step and change no value.
    """

    @staticmethod
    def forward(ctx, x, *params):  # type: ignore[override]
        ctx.metas = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return (grad, *(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.metas))


def _touch_output(out: Any, params: list[nn.Parameter]) -> Any:
    """``out`` with its loss (or first floating tensor: tensor, tuple/list item, dataclass field) touched."""
    if isinstance(out, torch.Tensor):
        return _TouchParams.apply(out, *params) if out.is_floating_point() and out.requires_grad else None
    if isinstance(out, (tuple, list)):
        for i, item in enumerate(out):
            new = _touch_output(item, params)
            if new is not None:
                items = [*out[:i], new, *out[i + 1 :]]
                return type(out)(items) if type(out) in (tuple, list) else type(out)(*items)  # a namedtuple takes fields
        return None
    fields = getattr(out, "__dataclass_fields__", None)
    if fields:
        for name in (["loss"] if "loss" in fields else []) + [f for f in fields if f != "loss"]:
            new = _touch_output(getattr(out, name), params)
            if new is not None:
                setattr(out, name, new)
                return out
    return None


def _expose_dataclasses(obj: Any, depth: int = 0) -> None:
    """Register the dataclass types in a unit's output as pytree nodes, so FSDP2 finds their tensors.

    FSDP2 hooks its pre-backward (re-gather the parameters) on the tensors it finds by flattening a
    unit's output; a dataclass (``EncoderOutput``, ``ModelOutput``, ``Routing``) is opaque to it, so the
    backward would run on freed parameters. transformers registers its ``ModelOutput`` the same way.
    """
    import torch.utils._pytree as pytree

    if depth > 4:
        return
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if type(obj) not in pytree.SUPPORTED_NODES:
            pytree.register_dataclass(type(obj))
        for f in dataclasses.fields(obj):
            _expose_dataclasses(getattr(obj, f.name), depth + 1)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _expose_dataclasses(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            _expose_dataclasses(item, depth + 1)


def _register_output_hook(unit: nn.Module, names: list[str], touch: bool) -> None:
    def hook(module, args, out):
        _expose_dataclasses(out)
        if not touch or not torch.is_grad_enabled():
            return None
        # during forward FSDP2 has swapped in the unsharded parameters: look them up by name now
        params = [p for n in names if (p := module.get_parameter(n)).requires_grad]
        new = _touch_output(out, params) if params else None
        return None if new is None else new

    unit.register_forward_hook(hook, prepend=True)  # before FSDP's post-forward reshards and hooks the output


def apply_fsdp(
    model: nn.Module,
    *,
    param_dtype: Union[None, str, torch.dtype] = None,
    reduce_dtype: Union[None, str, torch.dtype] = None,
    mesh: Any = None,
    reshard_after_forward: bool = True,
    units: Optional[Iterable[str]] = None,
    zero_unused_grads: bool = True,
) -> list[str]:
    """Shard ``model`` with FSDP2: ``fully_shard`` on each unit (deepest first), then the root; returns the units.

    ``param_dtype`` / ``reduce_dtype``: the compute and gradient-reduce dtypes (``"bf16"``; None = the
    parameters' own); the sharded masters keep theirs. ``mesh``: a 1-D DeviceMesh (default: every rank).
    ``units``: module names (default :func:`default_units`). Expert-parallel shards must already be made
    (:func:`shard_experts`); FSDP leaves them alone. ``zero_unused_grads``: see :class:`_TouchParams`.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype, "param_dtype"), reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"))
    _require_dist("apply_fsdp")
    unsharded = [n for n, layer in ep_layers(model) if layer.ep_shard is None]
    if unsharded:
        raise AudioMoEError(f"MoE layers {unsharded[:3]} have expert_parallel > 1 but are not sharded: call shard_experts(model) before apply_fsdp")
    if mesh is None:
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = {p for _, p, _ in expert_parameters(model)}
    ignored_ids = {id(p) for p in ignored}
    names = list(default_units(model) if units is None else units)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise AudioMoEError(f"fsdp units {missing} are not modules of the model; name modules as model.named_modules() does")
    order = sorted(names, key=lambda n: -n.count(".")) + [""]  # inner units first: an outer unit skips their parameters
    taken: set[str] = set()
    for name in order:
        unit = modules[name]
        pre = f"{name}." if name else ""
        own = [k for k, p in unit.named_parameters() if pre + k not in taken and id(p) not in ignored_ids]
        taken |= {pre + k for k in own}
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)
        _register_output_hook(unit, own, zero_unused_grads)
    return names


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

    sharded = {(f"{n}.experts." if n else "experts."): layer for n, layer in ep_layers(model) if layer.ep_shard is not None}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        pre = next((p for p in sharded if key.startswith(p)), None)
        if pre is None:
            out[key] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
            continue
        shard, rest = sharded[pre].ep_shard, key[len(pre) :]
        parts = [p.cpu() for p in _gather(value.detach(), shard.group)]
        if isinstance(sharded[pre].experts, GroupedSwiGLU):
            out[key] = torch.cat(parts)  # stacked [E/N, ...] blocks -> [E, ...]
        else:  # one module per expert: local index i on EP rank r is expert r * E/N + i
            i, tail = rest.split(".", 1)
            for r, t in enumerate(parts):
                out[f"{pre}{r * shard.local + int(i)}.{tail}"] = t
    if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return out


def save_full_safetensors(model: nn.Module, path: Union[str, os.PathLike], metadata: Optional[dict[str, str]] = None) -> None:
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

    sharded = {(f"{n}.experts." if n else "experts."): layer for n, layer in ep_layers(model) if layer.ep_shard is not None}
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
                    raise AudioMoEError(f"'{src}' holds {full.shape[0]} experts, the model {shard.num_experts}; load a checkpoint of the same num_experts")
                full = full[shard.lo : shard.hi]
            local[key] = full
            used.add(src)
        elif key in state:
            full = state[key]
            if isinstance(value, DTensor):  # every rank holds the full tensor: slice locally, no scatter
                full = distribute_tensor(full.to(device=value.device, dtype=value.dtype), value.device_mesh, value.placements, src_data_rank=None)
            local[key] = full
            used.add(key)
    if strict:
        missing = sorted(set(model.state_dict()) - set(local))
        extra = sorted(k for k in state if k not in used and not any(k.startswith(p) for p in sharded))
        if missing or extra:
            raise AudioMoEError(f"state dict does not match the model: missing {missing[:5]}, unexpected {extra[:5]}; build the model from the checkpoint's spec")
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
            raise AudioMoEError(f"optimizer state of '{name}' (a per-expert module under expert parallelism) cannot be gathered; use expert kind 'swiglu'")
        out[id(p)] = shard
    return out


@torch.no_grad()
def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, rank0_only: bool = False) -> dict[str, Any]:
    """``optimizer.state_dict()`` with one-process tensors: expert moments gathered, FSDP shards unsharded. Collective."""
    from torch.distributed.tensor import DTensor

    experts, live = _expert_blocks(model), optimizer.state_dict()
    state = {"param_groups": live["param_groups"], "state": {}}  # state_dict() shares the live per-parameter dicts: copy
    for idx, p in enumerate(_optimizer_params(optimizer)):
        if id(p) in experts:  # every rank of the EP group must join the gather, or none
            has = torch.tensor([1 if idx in live["state"] else 0], device=p.device)
            dist.all_reduce(has, group=experts[id(p)].group)
            if 0 < int(has) < experts[id(p)].size:
                raise AudioMoEError(f"optimizer state of expert parameter {idx} exists on only {int(has)} of {experts[id(p)].size} EP ranks; save after a full step")
        if idx not in live["state"]:
            continue
        entry = state["state"][idx] = {}
        for key, v in live["state"][idx].items():
            if isinstance(v, DTensor):
                v = v.full_tensor()
            elif id(p) in experts and torch.is_tensor(v) and v.shape == p.shape:
                v = torch.cat(_gather(v, experts[id(p)].group))
            entry[key] = v.detach().cpu().clone() if torch.is_tensor(v) else v
    if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return state


@torch.no_grad()
def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a one-process optimizer state (:func:`full_optimizer_state_dict`) at ``model``'s layout (no collective)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    experts = _expert_blocks(model)
    params = _optimizer_params(optimizer)
    local = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        out = {}
        for key, v in entry.items():
            if torch.is_tensor(v) and isinstance(p, DTensor) and v.dim() and v.shape == p.shape:
                v = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            elif torch.is_tensor(v) and id(p) in experts and v.dim() and v.shape[0] == experts[id(p)].num_experts and v.shape[1:] == p.shape[1:]:
                v = v[experts[id(p)].lo : experts[id(p)].hi]
            out[key] = v
        local["state"][idx] = out
    optimizer.load_state_dict(local)


__all__ = [
    "apply_fsdp", "clip_grad_norm_", "default_units", "expert_groups", "expert_parameters", "full_optimizer_state_dict",
    "full_state_dict", "ignore_experts_in_ddp", "load_full_optimizer_state_dict", "load_full_safetensors",
    "load_full_state_dict", "reduce_expert_grads", "save_full_safetensors", "shard_experts",
]  # fmt: skip
