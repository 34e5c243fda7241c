"""Running large models: FSDP2 for the backbone and encoders, next to expert parallelism for the MoE layers.

References: torchtitan trains MoE models with FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per
Transformer block, then the root; ``MixedPrecisionPolicy`` for bf16 params / fp32 reduce) plus expert
parallelism on the same ranks; UniMoE-Audio trained with EP 4 on DeepSpeed-MoE. The EP layer itself is
:mod:`audiomoe.moe.expert_parallel` and the full-state checkpoints are :mod:`audiomoe.train.fullstate`;
both are re-exported here, so a script that shards a model imports one module.

Layouts:

- DDP + EP: ``shard_experts(model)``, ``ignore_experts_in_ddp(model)``, ``DistributedDataParallel(model)``;
  per step ``backward``, ``reduce_expert_grads(model)``, ``clip_grad_norm_(model, c)``, ``step``.
- FSDP2 (+ EP): ``shard_experts(model)`` then ``apply_fsdp(model, param_dtype=..., reduce_dtype=...)``; the
  expert shards are left out of FSDP (``ignored_params``) and reduced by ``reduce_expert_grads``.
- 2-D mesh (EP x FSDP over the data-parallel replicas): ``audiomoe.train.mesh2d.apply_2d(model, N)`` instead of
  both calls above; the expert blocks are FSDP-sharded over their replicas.
- Checkpoints: ``save_full_safetensors(model, path)`` (collective; rank 0 writes each expert once as
  full tensors, the keys and shapes of the one-process model) and ``load_full_safetensors(model, path)``
  (slices experts for this rank's EP block and parameters for its FSDP shard).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.moe.expert_parallel import (  # re-exported (__all__): a script imports one module
    clip_grad_norm_,
    ep_layers,
    expert_groups,
    expert_parameters,
    ignore_experts_in_ddp,
    reduce_expert_grads,
    shard_experts,
)
from audiomoe.train.fullstate import (  # re-exported (__all__)
    full_optimizer_state_dict,
    full_state_dict,
    load_full_optimizer_state_dict,
    load_full_safetensors,
    load_full_state_dict,
    save_full_safetensors,
)

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
UNIT_LISTS = ("blocks", "layers")  # ModuleLists whose children are Transformer blocks (audiomoe, transformers)


def _dtype(value: Union[None, str, torch.dtype], key: str) -> Optional[torch.dtype]:
    """A dtype from a config string (``bf16``, ``float32``, ...) or a ``torch.dtype``; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise AudioMoEError(
            f"fsdp {key}={value!r} is not a dtype; use one of {', '.join(sorted(_DTYPES))} or null (keep the parameters' dtype)"
        )
    return _DTYPES[value]


def _require_dist(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise AudioMoEError(
            f"{what} needs torch.distributed: start with torchrun and call torch.distributed.init_process_group first"
        )


def _callable_block(m: nn.Module) -> bool:
    """A module with children and a forward of its own (not a container, not a bare layer)."""
    return bool(list(m.children())) and not isinstance(
        m, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
    )


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
    def forward(ctx, x, *params):  # type: ignore[override]  # autograd.Function's own signature
        ctx.metas = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]  # autograd.Function's own signature
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
                # a namedtuple takes fields, a tuple or list one iterable
                return type(out)(items) if type(out) in (tuple, list) else type(out)(*items)
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

    policy = MixedPrecisionPolicy(
        param_dtype=_dtype(param_dtype, "param_dtype"), reduce_dtype=_dtype(reduce_dtype, "reduce_dtype")
    )
    _require_dist("apply_fsdp")
    unsharded = [n for n, layer in ep_layers(model) if layer.ep_shard is None]
    if unsharded:
        raise AudioMoEError(
            f"MoE layers {unsharded[:3]} have expert_parallel > 1 but are not sharded: call shard_experts(model) before apply_fsdp"
        )
    if mesh is None:
        device = next(model.parameters()).device
        if device.type == "meta":  # a meta-built model (meta_init): the mesh lives where the process group computes
            device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = {p for _, p, _ in expert_parameters(model)}
    ignored_ids = {id(p) for p in ignored}
    names = list(default_units(model) if units is None else units)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise AudioMoEError(
            f"fsdp units {missing} are not modules of the model; name modules as model.named_modules() does"
        )
    order = sorted(names, key=lambda n: -n.count(".")) + [""]  # inner units first: an outer unit skips their parameters
    taken: set[str] = set()
    for name in order:
        unit = modules[name]
        pre = f"{name}." if name else ""
        own = [k for k, p in unit.named_parameters() if pre + k not in taken and id(p) not in ignored_ids]
        taken |= {pre + k for k in own}
        fully_shard(
            unit,
            mesh=mesh,
            mp_policy=policy,
            reshard_after_forward=reshard_after_forward,
            ignored_params=ignored or None,
        )
        _register_output_hook(unit, own, zero_unused_grads)
    return names


__all__ = [
    "apply_fsdp",
    "clip_grad_norm_",
    "default_units",
    "expert_groups",
    "expert_parameters",
    "full_optimizer_state_dict",
    "full_state_dict",
    "ignore_experts_in_ddp",
    "load_full_optimizer_state_dict",
    "load_full_safetensors",
    "load_full_state_dict",
    "reduce_expert_grads",
    "save_full_safetensors",
    "shard_experts",
]
