"""Activation checkpointing per block: every backbone's blocks and every encoder's transformer layers.

Chen et al. 2016 ("Training Deep Nets with Sublinear Memory Cost"): a checkpointed block keeps only
its inputs for backward and runs its forward again when the gradient reaches it, so the activations
held between forward and backward drop from ``L`` blocks' worth to ``L`` block inputs plus one block's
worth during its backward, for about one extra forward of compute. torchtitan's ``apply_ac`` is the
model: ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` per Transformer block.

Modes (``train.activation_checkpointing``):

- ``none``: nothing is recomputed.
- ``full``: each block is recomputed whole.
- ``selective``: op-level selective checkpointing (torchtitan's ``op`` SAC, Korthikanti et al. 2022):
  the outputs of the matmuls (every second one), attention kernels and collectives are kept, the
  cheap elementwise work between them is recomputed (``torch.utils.checkpoint.create_selective_checkpoint_contexts``).

Units (:func:`checkpoint_units`): the children of every ``blocks`` / ``layers`` ModuleList that are
blocks with a forward of their own (audiomoe's MoE blocks; transformers' decoder and encoder layers:
``causal_lm``'s LM, Whisper / HuBERT / wav2vec2 / WavLM, the mixture's base and weak encoders), never
a router's layers. transformers' layers are switched through their own checkpointing hook (which also
drops the KV cache a recompute would write twice); any other block's class is swapped for a subclass
whose ``forward`` checkpoints (as FSDP2 swaps classes), so parameter names, state dicts, deep copies and
module hooks (FSDP2's unshard / reshard stay outside the checkpoint) are unchanged.

Replay: a recompute runs the block's forward a second time, inside backward. The module attributes
that forward writes (an MoE layer's ``last_stats``, an upcycled MLP's ``routing`` and its hooked
``attention_mask``, a random router's call counter) are set, for the recompute, to what they were when
the block first ran, and put back afterwards (:class:`_Replay`): the recompute routes exactly as the
forward did, and what the model reads after backward is the first forward's. The RNG state (router
jitter and noise, dropout) is replayed by ``checkpoint`` itself. Aux losses of the recompute are
discarded: only the first forward's are in the loss. Buffers written in forward (e.g. BatchNorm's
running statistics) are not replayed; no block here has one.
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from functools import partial
from typing import Any, Callable, Literal

import torch
from torch import nn

from audiomoe.core.errors import AudioMoEError

Mode = Literal["none", "full", "selective"]
MODES = ("none", "full", "selective")
UNIT_LISTS = ("blocks", "layers")  # ModuleLists whose children are Transformer blocks (audiomoe, transformers)
_TAG = "_audiomoe_ac_mode"


def _is_block(m: nn.Module) -> bool:
    return bool(list(m.children())) and not isinstance(
        m, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
    )


def checkpoint_units(model: nn.Module) -> list[str]:
    """Names of the modules :func:`apply_activation_checkpointing` checkpoints: each block of a ``blocks``/``layers`` list.

    Lists inside routers are skipped (a scorer's layers are read, not called as blocks), and so are
    blocks nested in another unit (the outer one already recomputes them).
    """
    from audiomoe.core.interfaces import Router

    routers = [n for n, m in model.named_modules() if isinstance(m, Router)]
    units: list[str] = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(name == r or name.startswith(r + ".") for r in routers):
            continue
        if any(name.startswith(u + ".") for u in units):
            continue
        if isinstance(module, nn.ModuleList) and parts[-1] in UNIT_LISTS and all(_is_block(c) for c in module):
            units += [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return units


def _hf_layer(module: nn.Module) -> bool:
    """A transformers layer with its own checkpointing hook (``GradientCheckpointingLayer``)."""
    layers = sys.modules.get("transformers.modeling_layers")
    return layers is not None and isinstance(module, layers.GradientCheckpointingLayer)


class _Replay:
    """The forward's module attributes, put in place for the recompute and taken back after it (see the module doc)."""

    def __init__(self, module: nn.Module) -> None:
        self.modules = list(module.modules())
        self.first: list[dict[str, Any]] = []

    @staticmethod
    def _state(m: nn.Module) -> dict[str, Any]:
        # public attributes only: parameters, buffers, submodules and hooks live under "_" names, and FSDP2
        # swaps parameters between forward and backward, which must stay as it left them
        return {k: v for k, v in vars(m).items() if not k.startswith("_")}

    @contextlib.contextmanager
    def forward(self):
        """Around the first forward: remember the attributes it starts from."""
        self.first = [self._state(m) for m in self.modules]
        yield

    @contextlib.contextmanager
    def recompute(self):
        """Around the recompute: start from the first forward's attributes, restore the current ones after."""
        now = [self._state(m) for m in self.modules]
        try:
            for m, state in zip(self.modules, self.first):
                _set_state(m, state)
            yield
        finally:
            for m, state in zip(self.modules, now):
                _set_state(m, state)


def _set_state(m: nn.Module, state: dict[str, Any]) -> None:
    d = vars(m)
    for k in [k for k in d if not k.startswith("_") and k not in state]:
        del d[k]  # an attribute the recompute (or forward) created
    d.update(state)


_SAVE_OPS: tuple[str, ...] = (
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten.baddbmm.default",
    "aten._grouped_mm.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_attention_math.default",
    "_c10d_functional.all_to_all_single.default",
    "_c10d_functional.reduce_scatter_tensor.default",
)
_MATMULS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default")


def _selective_policy() -> Callable[..., Any]:
    """torchtitan's op-level policy: keep attention and collective outputs and every second matmul's output."""
    from torch.utils.checkpoint import CheckpointPolicy

    count: dict[str, int] = defaultdict(int)  # one policy per checkpoint call: forward and recompute count alike

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        name = str(func)
        if name in _MATMULS:
            key = "recompute" if ctx.is_recompute else "forward"
            count[key] += 1
            if count[key] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if name in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


@contextlib.contextmanager
def _entered(*managers: Any):
    """Enter ``managers`` in order when entered itself (``checkpoint`` enters each of its two contexts later)."""
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


def _contexts(replay: _Replay, mode: str) -> tuple[Any, Any]:
    """``checkpoint``'s ``context_fn``: the replay of module attributes, plus the selective caching modes."""
    if mode != "selective":
        return replay.forward(), replay.recompute()
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    sac_fwd, sac_rec = create_selective_checkpoint_contexts(_selective_policy())
    return _entered(replay.forward(), sac_fwd), _entered(replay.recompute(), sac_rec)


def checkpointed_call(module: nn.Module, mode: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` (``module``'s forward) under ``mode``'s checkpointing (public: other wrappers call it)."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    replay = _Replay(module)
    # An expert-parallel layer runs all-to-alls in its forward; a recompute stopped early (once it has what
    # backward needs) could stop before them on one rank and not another, so it runs whole there
    ep = any(getattr(m, "ep_shard", None) is not None for m in replay.modules)
    with set_checkpoint_early_stop(not ep):
        return checkpoint(fn, *args, use_reentrant=False, context_fn=partial(_contexts, replay, mode), **kwargs)


_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """``cls`` with a ``forward`` that checkpoints in training with gradients on (one subclass per class)."""
    if cls not in _CLASSES:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self.training and torch.is_grad_enabled():
                return checkpointed_call(self, getattr(self, _TAG), partial(cls.forward, self), *args, **kwargs)
            return cls.forward(self, *args, **kwargs)

        forward.__doc__ = cls.forward.__doc__
        _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "_audiomoe_ac_base": cls})
    return _CLASSES[cls]


def _unwrap(module: nn.Module) -> None:
    if getattr(module, _TAG, None) is None:
        return
    if _hf_layer(module):
        module.gradient_checkpointing = False
        vars(module).pop("_gradient_checkpointing_func", None)
    else:
        base = type(module).__dict__.get("_audiomoe_ac_base")
        if base is None:
            raise AudioMoEError(
                f"{type(module).__name__} was re-classed after activation checkpointing was applied (e.g. by FSDP2): "
                "set the mode before sharding"
            )
        module.__class__ = base
    delattr(module, _TAG)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> list[str]:
    """Checkpoint every block of ``model`` (:func:`checkpoint_units`) in ``mode``; returns the units' names.

    ``none`` removes checkpointing put on before. Apply before FSDP2 / DDP wrapping (as torchtitan does):
    their hooks then stay outside the checkpoint. Blocks recompute only in training with gradients on;
    eval, ``no_grad`` and decoding run them as they are.
    """
    if mode not in MODES:
        raise AudioMoEError(f"activation_checkpointing={mode!r} is not a mode; use one of {', '.join(MODES)}")
    names = checkpoint_units(model)
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        _unwrap(module)
        if mode == "none":
            continue
        if _hf_layer(module):
            # transformers' own hook checkpoints forward (not __call__) and drops the KV cache first
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = partial(_hf_checkpoint, module, mode)
        else:
            module.__class__ = _checkpointed_class(type(module))
        setattr(module, _TAG, mode)
    return names if mode != "none" else []


def _hf_checkpoint(module: nn.Module, mode: str, fn: Callable[..., Any], *args: Any) -> Any:
    return checkpointed_call(module, mode, fn, *args)


def checkpoint_mode(model: nn.Module) -> str:
    """The mode the blocks of ``model`` are checkpointed in (``none`` when none is)."""
    modes = {getattr(m, _TAG) for m in model.modules() if getattr(m, _TAG, None) is not None}
    if len(modes) > 1:
        return "mixed"
    return modes.pop() if modes else "none"


__all__ = ["MODES", "apply_activation_checkpointing", "checkpoint_mode", "checkpoint_units", "checkpointed_call"]
