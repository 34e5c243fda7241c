"""Meta-device construction for distributed runs: build on ``meta``, shard, then materialise only this rank's shards.

torchtitan builds its models under ``torch.device("meta")``, applies ``fully_shard`` / expert parallelism,
then ``to_empty`` and re-initialises (``init_weights``) or loads a seed checkpoint, so no rank ever holds the
full model. audiomoe must keep today's initial weights exactly (the CPU build under ``spec.seed``, so a
distributed run's losses equal a one-process run's), and its initialisers are whatever each component's
constructor does (``nn.Linear``'s kaiming init, transformers' ``_init_weights``, stacked expert uniforms,
buffers computed from ``arange``). So the constructor is *recorded*, not re-implemented:

1. :func:`record_build` runs :func:`audiomoe.core.composer.build_model` on ``meta`` under a
   ``TorchDispatchMode`` that logs every ATen call (tensors as storage + geometry references). A random op
   (any op whose schema takes a ``Generator``) also runs once on a CPU scratch tensor of the same geometry,
   so the generator advances exactly as in the CPU build (``manual_seed``, ``fork_rng`` and explicit
   generators keep working) and the generator state before it is kept with the op.
2. The caller shards the meta model (``shard_experts``, ``apply_fsdp``: no memory).
3. :func:`materialize` ``to_empty``-s the sharded model and replays the log on CPU, one storage at a
   time: a storage lives from the op that creates it to its last use; then each parameter or buffer on
   it is cut to this rank's piece (EP expert block, then FSDP's dim-0 chunk) and the full tensor is freed.
   Peak host memory is the shards plus the largest tensor alive at once (one parameter for ordinary
   constructors), not the model.

A resumed run reads only this rank's rows of the checkpoint (:func:`load_shards`: plain reads at their file
offsets straight into the ``to_empty``-ed shards; no memory map, no full tensor, no staging copy).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from audiomoe.core.errors import AudioMoEError
from audiomoe.train.meta_shards import Piece, cut, fill, model_tensors, stored_tensors

_META = torch.device("meta")


@dataclass(frozen=True)
class _Ref:
    """A tensor in the log: which storage, and the view of it (dtype, size, stride, offset)."""

    storage: int
    dtype: torch.dtype
    size: tuple
    stride: tuple
    offset: int


@dataclass
class _Op:
    func: Any
    args: tuple
    kwargs: dict
    outs: list  # (_Ref, new storage nbytes or -1) per output tensor
    rng: Optional[torch.Tensor] = None  # the default CPU generator's state before a random op
    gen: Optional[tuple] = None  # (generator, state) for an op given an explicit generator


@dataclass
class Program:
    """A recorded constructor: the ATen calls in order, the storages they touch, and where the model's tensors live."""

    ops: list = field(default_factory=list)
    constants: dict = field(default_factory=dict)  # storage id -> real storage seen before any op made it
    tensors: dict = field(default_factory=dict)  # model tensor name -> _Ref (params, buffers, tensor attributes)

    def last_use(self) -> dict[int, int]:
        """Storage id -> index of the last op touching it."""
        out: dict[int, int] = {}
        for i, op in enumerate(self.ops):
            for r in _refs((op.args, op.kwargs)) + [o for o, _ in op.outs]:
                out[r.storage] = i
        return out


def _refs(tree: Any) -> list[_Ref]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, _Ref)]


# random ops whose default overload takes no Generator argument (``randn.default``, ``rand_like``, dropout)
_RANDOM = set(
    "rand randn randint randperm rand_like randn_like randint_like native_dropout normal bernoulli multinomial "
    "poisson rrelu_with_noise exponential geometric cauchy log_normal random uniform".split()
)


def _is_random(func: Any) -> bool:
    """Whether an ATen op draws from a generator (so it needs the generator state it ran with)."""
    name = func.overloadpacket.__name__.rstrip("_")
    return name in _RANDOM or any(str(a.type) in ("Optional[Generator]", "Generator") for a in func._schema.arguments)


class _Recorder(TorchDispatchMode):
    """Logs every ATen call of a meta build (module doc, step 1)."""

    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program
        self.ids: dict[StorageWeakRef, int] = {}
        self.keep: list[torch.Tensor] = []  # keeps recorded storages alive, so their ids are never reused

    def ref(self, t: torch.Tensor, new_ok: bool = False) -> tuple[_Ref, bool]:
        st = t.untyped_storage()
        key = StorageWeakRef(st)
        new = key not in self.ids
        if new:
            self.ids[key] = len(self.ids)
            self.keep.append(t)
            if not new_ok:  # an input no logged op made: a constant (a CPU tensor made before, or outside, the build)
                if t.device.type == "meta":
                    raise AudioMoEError(
                        "meta init: the constructor used a meta tensor made outside the build; "
                        "set distributed.meta_init: false to build on CPU"
                    )
                self.program.constants[self.ids[key]] = st.clone()
        r = _Ref(self.ids[key], t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())
        return r, new

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            raise AudioMoEError(
                "meta init: a constructor reads a tensor value (.item() / bool()) while building; "
                "set distributed.meta_init: false to build this model on CPU"
            )
        rec = tree_map(lambda x: self.ref(x)[0] if isinstance(x, torch.Tensor) else x, (args, kwargs))
        op = _Op(func, rec[0], rec[1], [])
        if _is_random(func):
            gen = kwargs.get("generator")
            if gen is not None:
                op.gen = (gen, gen.get_state())
            else:
                op.rng = torch.get_rng_state()
            if any(
                isinstance(x, torch.Tensor) and x.device.type == "meta" for x in tree_flatten((args, kwargs))[0]
            ) or (kwargs.get("device") == _META):
                # advance the generator as the CPU build would: the same op on CPU scratch of the same geometry
                a, k = tree_map(_scratch, (args, kwargs))
                func(*a, **k)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                r, new = self.ref(t, new_ok=True)
                op.outs.append((r, t.untyped_storage().nbytes() if new else -1))
        self.program.ops.append(op)
        return out


def _scratch(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
    return torch.device("cpu") if isinstance(x, torch.device) and x.type == "meta" else x


@contextlib.contextmanager
def _hf_inits_on_meta() -> Iterator[None]:
    """transformers skips ``_init_weights`` when it sees a meta device context; the CPU build runs it, so must the log."""
    try:
        from transformers import modeling_utils
    except ImportError:  # pragma: no cover - transformers is a dependency; without it there is nothing to patch
        yield
        return
    old = modeling_utils.get_torch_context_manager_or_global_device
    modeling_utils.get_torch_context_manager_or_global_device = lambda: None
    try:
        yield
    finally:
        modeling_utils.get_torch_context_manager_or_global_device = old


def record_build(resolved: Any) -> tuple[nn.Module, Program]:
    """Build ``resolved`` (a resolved spec) on the meta device, recording its constructor; ``(meta model, program)``."""
    from audiomoe.core.composer import build_model

    program = Program()
    rec = _Recorder(program)
    with torch.device("meta"), rec, _hf_inits_on_meta():
        model = build_model(resolved)
    for name, t in model_tensors(model).items():
        # a CPU tensor (the legacy ``torch.Tensor(n)`` ignores the device context) counts as made by the build
        program.tensors[name] = rec.ref(t.detach(), new_ok=False)[0]
    return model, program


def _view(storage: torch.UntypedStorage, r: _Ref) -> torch.Tensor:
    return torch.empty(0, dtype=r.dtype).set_(storage, r.offset, r.size, r.stride)


@torch.no_grad()
def replay(program: Program, take: Callable[[str, torch.Tensor], None], names: Optional[set] = None) -> int:
    """Run ``program`` on CPU; call ``take(name, full_tensor)`` for each model tensor once its storage is final.

    Storages are freed after their last use, so at most the tensors alive together are held (module doc).
    ``names``: only these model tensors are handed over (default all). Returns the peak bytes of live storages.
    """
    last = program.last_use()
    by_storage: dict[int, list[str]] = {}
    for name, r in program.tensors.items():
        if names is None or name in names:
            by_storage.setdefault(r.storage, []).append(name)
    live: dict[int, torch.UntypedStorage] = {k: v.clone() for k, v in program.constants.items()}
    peak = cur = sum(s.nbytes() for s in live.values())
    cpu = torch.device("cpu")

    def real(x: Any) -> Any:
        if isinstance(x, _Ref):
            return _view(live[x.storage], x)
        return cpu if isinstance(x, torch.device) and x.type == "meta" else x

    with torch.random.fork_rng(devices=[]):
        for i, op in enumerate(program.ops):
            args, kwargs = tree_map(real, (op.args, op.kwargs))
            if op.rng is not None:
                torch.set_rng_state(op.rng)
            if op.gen is not None:
                kwargs["generator"] = torch.Generator().set_state(op.gen[1])
            out = op.func(*args, **kwargs)
            flat = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            for t, (r, nbytes) in zip(flat, op.outs):
                if nbytes >= 0 and r.storage not in live:
                    live[r.storage] = t.untyped_storage()
                    cur += live[r.storage].nbytes()
            del out, flat, args, kwargs
            peak = max(peak, cur)
            for s in [s for s in list(live) if last.get(s, -1) <= i]:
                for name in by_storage.get(s, ()):
                    take(name, _view(live[s], program.tensors[name]))
                cur -= live[s].nbytes()
                del live[s]
        for s, st in live.items():  # constants no op touched
            for name in by_storage.get(s, ()):
                take(name, _view(st, program.tensors[name]))
    return peak


def full_state(program: Program) -> dict[str, torch.Tensor]:
    """Every model tensor of the recorded build as a full CPU tensor (tests: equals the CPU build's)."""
    out: dict[str, torch.Tensor] = {}
    replay(program, lambda n, t: out.__setitem__(n, t.clone()))
    return out


def materialize(model: nn.Module, program: Program, device: Union[str, torch.device] = "cpu") -> dict[str, int]:
    """Give a meta-built, sharded ``model`` this rank's pieces of the recorded seeded init (module doc, step 3).

    The values equal the CPU build's (``build_model`` under the same spec seed) cut to this rank's shards.
    Returns ``{"tensors", "bytes" (local), "replay_peak" (bytes of full tensors alive at once)}``.
    """
    stats: dict[str, int] = {}

    def get(plan: dict[str, Piece], put: Callable[[str, torch.Tensor], None], target: Callable) -> None:
        by_source: dict[str, list[str]] = {}
        for name, piece in plan.items():
            by_source.setdefault(piece.source, []).append(name)

        def take(source: str, full: torch.Tensor) -> None:
            for name in by_source[source]:
                put(name, cut(full, plan[name]))

        stats["replay_peak"] = replay(program, take, set(by_source))

    stats.update(fill(model, device, get))
    return stats


def load_shards(
    model: nn.Module, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"
) -> dict[str, int]:
    """Give a meta-built, sharded ``model`` its pieces read from a full safetensors file (only those rows are read).

    The file is a one-process checkpoint (``save_full_safetensors``, a run's ``model.safetensors``). Each piece's
    rows are read with plain file reads (:class:`~audiomoe.train.meta_shards.StoredTensor`, no memory map) straight
    into the rank's ``to_empty``-ed local tensor, so the peak is the rank's shards alone: no full tensor, and no
    staging copy of a piece. Returns ``{"tensors", "bytes", "read"}`` (``read``: bytes read from the file).
    """
    if not os.path.isfile(path):
        raise AudioMoEError(f"checkpoint '{path}' does not exist; write one with save_full_safetensors(model, path)")
    stored = stored_tensors(path)
    read = [0]

    def get(plan: dict[str, Piece], put: Callable[[str, torch.Tensor], None], target: Callable) -> None:
        for name, piece in plan.items():
            src = stored.get(piece.source)
            if src is None:
                continue
            dst = target(name)
            rows = piece.rows if piece.rows is not None else ((0, src.shape[0]) if src.shape else None)
            want = [rows[1] - rows[0], *src.shape[1:]] if rows is not None else []
            fits = dst is not None and dst.dtype == src.dtype and list(dst.shape) == want
            value = src.read(piece.rows, out=dst if fits else None)
            read[0] += value.numel() * value.element_size()
            put(name, value)

    stats = fill(model, device, get)
    stats["read"] = read[0]
    return stats
