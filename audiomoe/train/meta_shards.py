"""This rank's pieces of a sharded model: which rows of which full (one-process) tensor each local tensor holds,
and filling a meta-built, sharded model with them (used by :mod:`audiomoe.train.meta_init`).

EP (:mod:`audiomoe.moe.expert_parallel`) keeps experts ``[lo, hi)`` of each layer; FSDP2 keeps dim-0 chunks as
``torch.chunk`` cuts them (torchtitan's meta init fills the same ``to_empty``-ed shards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from audiomoe.core.errors import AudioMoEError


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a module tree holds: parameters, buffers (persistent or not) and plain tensor attributes."""
    out: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        pre = f"{mname}." if mname else ""
        for k, v in list(m._parameters.items()) + list(m._buffers.items()):
            if v is not None:
                out.setdefault(pre + k, v)
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                out.setdefault(pre + k, v)
    return out


@dataclass(frozen=True)
class Piece:
    """Where a local tensor comes from: rows ``[lo, hi)`` (dim 0) of the full tensor ``source``; ``rows=None``: all."""

    source: str
    rows: Optional[tuple[int, int]]


def pieces(model: nn.Module) -> dict[str, Piece]:
    """For every tensor of a (meta-)sharded ``model``: which full (one-process) tensor and rows it holds.

    EP: a stacked expert tensor holds experts ``[lo, hi)``; a per-expert module ``experts.i`` is expert
    ``lo + i``. FSDP2 (a DTensor, ``Shard(0)`` over its mesh) holds the rows of its mesh coordinate within
    that, as ``torch.chunk`` cuts them (``compute_local_shape_and_global_offset``).
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from audiomoe.moe.expert_parallel import ep_layers
    from audiomoe.moe.grouped import GroupedSwiGLU

    sharded = {
        (f"{n}.experts." if n else "experts."): layer for n, layer in ep_layers(model) if layer.ep_shard is not None
    }
    out: dict[str, Piece] = {}
    for name, t in model_tensors(model).items():
        src, base = name, 0
        pre = next((p for p in sharded if name.startswith(p)), None)
        rows: Optional[tuple[int, int]] = None
        if pre is not None:
            shard = sharded[pre].ep_shard
            if isinstance(sharded[pre].experts, GroupedSwiGLU):
                rows, base = (shard.lo, shard.hi), shard.lo
            else:
                i, tail = name[len(pre) :].split(".", 1)
                src = f"{pre}{shard.lo + int(i)}.{tail}"
        if isinstance(t, DTensor):
            shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            if any(s != g for s, g in zip(shape[1:], t.shape[1:])):
                raise AudioMoEError(
                    f"'{name}' is sharded on a dimension other than 0 ({t.placements}); meta init reads dim-0 shards only"
                )
            rows = (base + offset[0], base + offset[0] + shape[0]) if t.dim() else None
        out[name] = Piece(src, rows)
    return out


def cut(full: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The rows of ``full`` that ``piece`` names (all of it when it names none)."""
    return full if piece.rows is None else full[piece.rows[0] : piece.rows[1]]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _set_attr(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod, _, attr = name.rpartition(".")
    setattr(model.get_submodule(mod), attr, value)


@torch.no_grad()
def fill(model: nn.Module, device: Union[str, torch.device], get: Callable[..., None]) -> dict[str, int]:
    """``to_empty`` the sharded ``model`` on ``device``, then ``get(plan, put)`` hands each tensor its piece through
    ``put(name, piece)``. Returns ``{"tensors": n, "bytes": local bytes}``; a tensor left without a value is an error."""
    plan = pieces(model)
    registered = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    registered |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    model.to_empty(device=device)
    live = model_tensors(model)
    done: set[str] = set()
    nbytes = [0]

    def put(name: str, value: torch.Tensor) -> None:
        if name not in registered:  # a plain tensor attribute: to_empty leaves it on meta
            _set_attr(model, name, value.to(device).clone())
        else:
            dst = _local(live[name])
            if dst.shape != value.shape:
                raise AudioMoEError(
                    f"'{name}': this rank holds {tuple(dst.shape)} but the source gives {tuple(value.shape)}; "
                    "build the model from the checkpoint's spec"
                )
            dst.copy_(value)
            nbytes[0] += dst.numel() * dst.element_size()
        done.add(name)

    get(plan, put)
    missing = sorted(set(plan) - done)
    if missing:
        raise AudioMoEError(f"meta init: no value for {missing[:5]}; the source does not match the model's spec")
    return {"tensors": len(done), "bytes": nbytes[0]}
