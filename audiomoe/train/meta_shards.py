"""This rank's pieces of a sharded model: which rows of which full (one-process) tensor each local tensor holds,
and filling a meta-built, sharded model with them (used by :mod:`audiomoe.train.meta_init`).

EP (:mod:`audiomoe.moe.expert_parallel`) keeps experts ``[lo, hi)`` of each layer; FSDP2 keeps dim-0 chunks as
``torch.chunk`` cuts them (torchtitan's meta init fills the same ``to_empty``-ed shards).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

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


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a safetensors file, not read yet: :meth:`read` gets only the dim-0 rows asked for.

    Rows are read with plain file reads at their offsets (safetensors: an 8-byte header length, a JSON header
    of dtype / shape / data offsets, raw little-endian bytes), not through a memory map, whose touched pages
    would count in the process's resident memory.
    """

    path: str
    name: str
    dtype: torch.dtype
    shape: tuple
    offset: int  # of the first byte in the file

    def dim(self) -> int:
        """The number of dimensions (as ``Tensor.dim``)."""
        return len(self.shape)

    def read(self, rows: Optional[tuple[int, int]] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows ``[lo, hi)`` of dim 0 (all: ``None``), read into ``out`` when given (contiguous, of that size)."""
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        lo, hi = rows if rows is not None else (0, self.shape[0] if self.shape else 1)
        shape = [hi - lo, *self.shape[1:]] if self.shape else []
        if out is None:
            out = torch.empty(shape, dtype=self.dtype)
        if not out.is_contiguous() or out.dtype != self.dtype or list(out.shape) != shape or out.device.type != "cpu":
            raise AudioMoEError(
                f"'{self.name}': cannot read rows {lo}:{hi} into a {out.dtype} {tuple(out.shape)} tensor"
            )
        if out.numel() == 0:  # an empty shard (FSDP's last ranks of a short dim 0): nothing to read
            return out
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + lo * row)
            if fh.readinto(view) != len(view):
                raise AudioMoEError(f"'{self.path}' is truncated at '{self.name}'; the checkpoint is damaged")
        return out

    def blocks(self, max_bytes: int = 1 << 22) -> Iterator[torch.Tensor]:
        """The tensor in dim-0 blocks of at most ``max_bytes`` (at least a row) read into one reused buffer, so a
        scan (e.g. for NaN) holds one block, not the tensor (glibc keeps freed heap blocks of up to 64 MB)."""
        if not self.shape or self.shape[0] == 0:
            yield self.read()
            return
        per = math.prod(self.shape[1:])
        step = max(1, max_bytes // max(1, per * self.dtype.itemsize))
        buf = torch.empty(min(step, self.shape[0]) * per, dtype=self.dtype)
        for lo in range(0, self.shape[0], step):
            hi = min(lo + step, self.shape[0])
            yield self.read((lo, hi), out=buf[: (hi - lo) * per].view(hi - lo, *self.shape[1:]))


def stored_tensors(path: Union[str, os.PathLike], error: type = AudioMoEError) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file as a :class:`StoredTensor` (reads the header only; ``error``: what a
    damaged file raises)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        try:
            header = json.loads(fh.read(n)) if 8 + n <= size else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise error(f"'{path}' has no valid safetensors header; the checkpoint is damaged, load an earlier one")
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = _ST_DTYPES[e["dtype"]], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            ok = 0 <= lo and hi - lo == math.prod(shape) * dtype.itemsize and 8 + n + hi <= size
        except (KeyError, TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise error(f"'{path}': '{name}' is truncated or malformed; the checkpoint is damaged, load an earlier one")
        out[name] = StoredTensor(path, name, dtype, shape, 8 + n + lo)
    return out


class ReadOnLookup(dict):
    """Tensors by name, a :class:`StoredTensor` read when looked up (``decode`` of a trainer state's small fields)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        v = super().__getitem__(key)
        return v.read() if isinstance(v, StoredTensor) else v


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
    """``to_empty`` the sharded ``model`` on ``device``, then ``get(plan, put, target)`` hands each tensor its piece
    through ``put(name, piece)``; ``target(name)`` is the local tensor a piece goes to when it is a contiguous CPU
    parameter or buffer (a loader may read into it, then ``put`` it: no copy), else None.
    Returns ``{"tensors": n, "bytes": local bytes}``; a tensor left without a value is an error."""
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
            if value.data_ptr() != dst.data_ptr() or value.stride() != dst.stride():
                dst.copy_(value)
            nbytes[0] += dst.numel() * dst.element_size()
        done.add(name)

    def target(name: str) -> Optional[torch.Tensor]:
        dst = _local(live[name]) if name in registered else None
        return dst if dst is not None and dst.device.type == "cpu" and dst.is_contiguous() else None

    get(plan, put, target)
    missing = sorted(set(plan) - done)
    if missing:
        raise AudioMoEError(f"meta init: no value for {missing[:5]}; the source does not match the model's spec")
    return {"tensors": len(done), "bytes": nbytes[0]}
