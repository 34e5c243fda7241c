"""A 2-D device mesh, expert-parallel x data-parallel: expert shards FSDP2-sharded over the data-parallel dimension.

With ``world = D x N`` ranks and expert parallelism ``N`` (:mod:`audiomoe.moe.expert_parallel`), the 1-D
layout keeps each EP rank's expert block whole on every one of the ``D`` ranks that hold it (replicas,
gradients all-reduced). Here, as torchtitan's ``dp_shard_mod_ep`` mesh does (``parallelize.py``:
``fully_shard(transformer_block.moe.experts, mesh=dp_mod_ep_mesh)``), the block is ``fully_shard``-ed
over those ``D`` ranks, so a rank stores ``1 / (D x N)`` of every expert tensor:

- mesh ``init_device_mesh(dev, (D, N), mesh_dim_names=("dp", "ep"))``, rank ``= d x N + e``: an ``"ep"``
  group is ``N`` consecutive ranks (same ``dp`` index; the all-to-all runs inside it, as in the 1-D
  layout), a ``"dp"`` group the ``D`` ranks holding the same expert block (``rank % N`` equal);
- each MoE layer's ``experts`` module: ``fully_shard(experts, mesh=mesh["dp"])``. The dispatcher calls
  the experts through plan methods (and the ``fused`` plan reads the stacked weights directly), never
  ``experts.forward``, so the whole expert computation of :func:`~audiomoe.moe.expert_parallel.ep_combine`
  runs as the FSDP forward method ``experts.ep_compute`` (``register_fsdp_forward_method``): all-gather
  over ``dp`` before, reshard after, reduce-scatter (the ``dp`` mean) in backward;
- everything else: FSDP2 over all ``D x N`` ranks (:func:`audiomoe.train.fsdp.apply_fsdp` on the 1-D
  world mesh, which is the flattened ``(dp, ep)`` mesh: same ranks, same order).

Gradient scale: an expert's gradient on a rank sums the losses of its EP group's ranks; FSDP's
reduce-scatter averages over ``dp``; :func:`~audiomoe.moe.expert_parallel.reduce_expert_grads` divides by
``N``: the mean over all ``D x N`` ranks, as the other parameters get from FSDP over the world.
Checkpoints (:mod:`audiomoe.train.fullstate`) unshard over ``dp`` then gather over ``ep``: the file is
the one-process model. Meta-device init (:mod:`audiomoe.train.meta_init`) works unchanged: an expert
DTensor's rows are its EP block's offset plus its ``dp`` chunk's.
"""

from __future__ import annotations

import types
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.moe.expert_parallel import ep_layers, shard_experts
from audiomoe.train.fsdp import _dtype, _TouchParams, apply_fsdp

DIMS = ("dp", "ep")


def mesh_device_type(model: Optional[nn.Module] = None) -> str:
    """Where the process group computes: the model's device type, or (a meta-built model) the backend's."""
    device = next(model.parameters()).device if model is not None else torch.device("meta")
    if device.type != "meta":
        return device.type
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def device_mesh_2d(expert_parallel: int, device_type: str = "cpu") -> Any:
    """The ``(dp, ep)`` DeviceMesh of this job for EP size ``expert_parallel`` (``dp = world / expert_parallel``).

    Collective (every rank calls it). Raises :class:`AudioMoEError` without a process group or when the
    world size is not a multiple of ``expert_parallel``.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise AudioMoEError(
            "the 2-D expert x data mesh needs torch.distributed: start with torchrun and call "
            "torch.distributed.init_process_group first"
        )
    world = dist.get_world_size()
    if expert_parallel < 1 or world % expert_parallel:
        raise AudioMoEError(
            f"world size {world} is not a multiple of expert_parallel={expert_parallel}: launch data_parallel x "
            f"expert_parallel processes (e.g. torchrun --nproc-per-node {2 * expert_parallel} for data_parallel 2)"
        )
    return init_device_mesh(device_type, (world // expert_parallel, expert_parallel), mesh_dim_names=DIMS)


def _ep_compute(self: nn.Module, dispatcher: nn.Module, *args: Any) -> torch.Tensor:
    """The expert part of ``ep_combine`` on this rank's received rows (an FSDP forward method of ``self``).

    Every parameter gets a gradient (zeros when no row reached an expert here), so every ``dp`` rank
    reduce-scatters the same set (see :class:`audiomoe.train.fsdp._TouchParams`).
    """
    y = dispatcher(*args, self)
    params = [p for p in self.parameters() if p.requires_grad]  # during the FSDP forward: the unsharded ones
    return _TouchParams.apply(y, *params) if params and torch.is_grad_enabled() else y


def shard_experts_over_dp(model: nn.Module, mesh: Any, policy: Any, reshard_after_forward: bool = True) -> list[str]:
    """EP-shard ``model``'s MoE layers over ``mesh["ep"]``, then ``fully_shard`` each expert block over ``mesh["dp"]``.

    Returns the names of the MoE layers whose experts were sharded.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    ep, dp = mesh[DIMS[1]], mesh[DIMS[0]]
    layers = ep_layers(model)
    wrong = [n for n, layer in layers if layer.params.expert_parallel != ep.size()]
    if wrong:
        raise AudioMoEError(
            f"MoE layers {wrong[:3]} have expert_parallel != the mesh's ep size {ep.size()}; "
            "build the model with backbone.moe.expert_parallel equal to the mesh's"
        )
    shard_experts(model, group=ep.get_group(), replica_group=dp.get_group())
    for _, layer in layers:
        fully_shard(layer.experts, mesh=dp, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        layer.experts.ep_compute = types.MethodType(_ep_compute, layer.experts)
        register_fsdp_forward_method(layer.experts, "ep_compute")
    return [n for n, _ in layers]


def apply_2d(
    model: nn.Module,
    expert_parallel: int,
    *,
    param_dtype: Union[None, str, torch.dtype] = None,
    reduce_dtype: Union[None, str, torch.dtype] = None,
    reshard_after_forward: bool = True,
    mesh: Any = None,
) -> Any:
    """Lay ``model`` out on the 2-D ``(dp, ep)`` mesh: experts EP x FSDP(dp), the rest FSDP2 over every rank.

    ``model``: built with ``backbone.moe.expert_parallel = expert_parallel`` and not yet sharded (CPU or
    ``meta``). ``mesh``: a ``(dp, ep)`` mesh (default :func:`device_mesh_2d`). Returns the mesh. Call
    before building the optimizer; per step: ``backward``, ``reduce_expert_grads``, ``clip_grad_norm_``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not ep_layers(model):
        raise AudioMoEError(
            "the 2-D expert x data mesh needs MoE layers built with expert_parallel > 1; "
            f"set backbone.moe.expert_parallel={expert_parallel}"
        )
    if mesh is None:
        mesh = device_mesh_2d(expert_parallel, mesh_device_type(model))
    if tuple(mesh.mesh_dim_names or ()) != DIMS:
        raise AudioMoEError(f"the 2-D mesh must have mesh_dim_names {DIMS}, got {mesh.mesh_dim_names}")
    policy = MixedPrecisionPolicy(
        param_dtype=_dtype(param_dtype, "param_dtype"), reduce_dtype=_dtype(reduce_dtype, "reduce_dtype")
    )
    shard_experts_over_dp(model, mesh, policy, reshard_after_forward)
    apply_fsdp(model, param_dtype=param_dtype, reduce_dtype=reduce_dtype, reshard_after_forward=reshard_after_forward)
    return mesh


__all__ = ["DIMS", "apply_2d", "device_mesh_2d", "shard_experts_over_dp"]
