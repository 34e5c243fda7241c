"""Sparse upcycling: turn the dense SwiGLU MLPs of a transformers causal LM into MoE layers.

Komatsuzaki et al. 2023 ("Sparse Upcycling") copy the dense FFN into every expert; UniMoE-Audio's
stage 2 builds the MoE from several dense *specialists*: expert ``e`` comes from checkpoint
``sources[e]``, and (optionally) attention and norms are the average of the specialists. DCMoE's
``--moe_copy`` variant fills fine-grained experts with consecutive slices of the dense intermediate
dimension (``init="slice"``). Works for models whose decoder layers hold ``mlp.gate_proj``,
``mlp.up_proj``, ``mlp.down_proj`` with a SiLU activation (Llama, Qwen2, Qwen2.5, Mistral, ...).

With ``init="copy"``, no null experts, no shared experts and a router whose weights sum to 1 over the
picks (e.g. ``linear_topk`` with ``normalize``), the upcycled model computes exactly the dense model.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Routing
from audiomoe.experts.moe_layer import MoELayer

Source = Union[nn.Module, str, os.PathLike]


class UpcycledMLP(nn.Module):
    """Drop-in replacement of a decoder layer's ``mlp``: [B, T, D] -> [B, T, D] through an MoE layer.

    The last routing record is kept in ``routing`` (its ``aux_losses`` are what training adds; see
    :func:`moe_aux_losses`). Hugging Face calls the MLP without a padding mask, so
    :func:`upcycle_causal_lm` hooks the model's forward to hand the 2-D ``attention_mask`` to every
    upcycled MLP for the duration of the call (``attention_mask``): padded tokens are then neither
    routed, computed nor counted in the balance loss.
    """

    def __init__(self, moe: MoELayer) -> None:
        super().__init__()
        self.moe = moe
        self.routing: Optional[Routing] = None
        self.attention_mask: Optional[torch.Tensor] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the MoE FFN to ``hidden_states`` [B, T, D] (padding from the hooked ``attention_mask``)."""
        pad = None
        mask = self.attention_mask
        if mask is not None and mask.dim() == 2 and hidden_states.dim() == 3 and mask.shape[0] == hidden_states.shape[0]:
            t = hidden_states.shape[1]
            if mask.shape[1] >= t:  # with a KV cache the mask covers past + current: the current are last
                pad = mask[:, -t:].to(hidden_states.device) == 0
        y, self.routing = self.moe(hidden_states, pad)
        return y


def _install_mask_hook(model: nn.Module) -> None:
    """Give every :class:`UpcycledMLP` the 2-D ``attention_mask`` of each ``model(...)`` call (once per model)."""
    if getattr(model, "_audiomoe_mask_hooks", None):
        return

    # the hooks use the module they are called with (not a closure), so a deep copy stays separate
    def before(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        for m in module.modules():
            if isinstance(m, UpcycledMLP):
                m.attention_mask = mask if isinstance(mask, torch.Tensor) else None

    def after(module, _args, _kwargs, _output):
        for m in module.modules():
            if isinstance(m, UpcycledMLP):
                m.attention_mask = None

    model._audiomoe_mask_hooks = (
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True, always_call=True),
    )


def moe_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The router aux losses of every upcycled layer's last forward, keyed ``<module path>/<name>``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, UpcycledMLP) and module.routing is not None:
            for k, v in module.routing.aux_losses.items():
                out[f"{name}/{k}"] = v
    return out


def _registry_builder(kind: str, spec: Any):
    from audiomoe.core.composer import component_builder

    return component_builder(kind, spec)


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise AudioMoEError(f"{type(model).__name__} has no .model.layers: upcycling supports Llama/Qwen2-style causal LMs")
    return layers


def _dense_mlp(layer: nn.Module, where: str) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        raise AudioMoEError(f"{where}.mlp is not a gated (gate_proj/up_proj/down_proj) MLP; cannot upcycle it")
    act = getattr(mlp, "act_fn", None)
    probe = torch.linspace(-6, 6, 25)
    # transformers has its own activation classes: compare values, not types
    if act is not None and not torch.allclose(act(probe), torch.nn.functional.silu(probe), atol=1e-6):
        raise AudioMoEError(f"{where}.mlp uses {type(act).__name__}; upcycling into SwiGLU experts needs SiLU (hidden_act='silu')")
    if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
        raise AudioMoEError(f"{where}.mlp has biases; SwiGLU experts are bias-free")
    return mlp


def _load(source: Source) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    from transformers import AutoModelForCausalLM

    path = os.fspath(source)
    if not os.path.isdir(path):
        raise AudioMoEError(f"dense checkpoint '{path}' is not a local directory (Hugging Face layout)")
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)


@torch.no_grad()
def _fill(expert: nn.Module, mlp: nn.Module, offset: int) -> None:
    """Copy rows ``[offset, offset + d_ff)`` (cyclic) of the dense intermediate dimension into ``expert``."""
    w_in, w_out = expert.swiglu_weights()
    f = w_out.shape[1]
    inter = mlp.gate_proj.weight.shape[0]
    rows = (torch.arange(f) + offset) % inter
    w_in[:f].copy_(mlp.gate_proj.weight[rows])
    w_in[f:].copy_(mlp.up_proj.weight[rows])
    w_out.copy_(mlp.down_proj.weight[:, rows])


@torch.no_grad()
def upcycle_causal_lm(
    model: nn.Module,
    *,
    num_experts: int,
    router: Any = "linear_topk",
    sources: Optional[Sequence[Source]] = None,
    init: Literal["copy", "slice"] = "copy",
    expert_d_ff: Optional[int] = None,
    num_null: int = 0,
    num_shared: int = 0,
    shared_mode: Literal["gated", "unit"] = "unit",
    shared_d_ff: Optional[int] = None,
    average_non_mlp: bool = False,
    capacity_factor: Optional[float] = None,
    backend: Literal["auto", "torch", "xformers"] = "auto",
    layers: Optional[Sequence[int]] = None,
) -> nn.Module:
    """Replace the dense MLPs of ``model`` (in place) by MoE layers initialised from dense weights.

    Args:
        model: a transformers causal LM with Llama/Qwen2-style decoder layers.
        num_experts: routed experts per layer.
        router: a router Builder, a registry name or a ``{name, params}`` spec (built for
            ``num_experts + num_null`` columns; new and randomly initialised, as in UniMoE).
        sources: one dense checkpoint per routed expert (in-memory models or local directories in
            Hugging Face layout); expert ``e`` is initialised from ``sources[e]``. Default: ``model``.
        init: ``"copy"`` = each expert is the whole dense MLP (width = intermediate size);
            ``"slice"`` = fine-grained experts, expert ``e`` takes the ``e``-th consecutive slice of the
            intermediate dimension (DCMoE ``--moe_copy``), width ``intermediate // num_experts``.
        expert_d_ff: expert width override (slices are taken cyclically).
        num_null, num_shared, shared_mode, shared_d_ff, capacity_factor, backend: as :class:`MoELayer`.
            Shared experts are initialised from ``model``'s own MLP (slice at offset 0 when narrower).
        average_non_mlp: set every non-MLP parameter to the mean over ``sources`` (UniMoE stage 2).
        layers: indices of the decoder layers to upcycle (default: all).

    Returns ``model`` (its ``mlp`` modules are now :class:`UpcycledMLP`; a forward hook passes the
    ``attention_mask`` of each call to them, so padded tokens are not routed).
    """
    decoder = _decoder_layers(model)
    srcs = [_load(s) for s in sources] if sources is not None else None
    if srcs is not None and len(srcs) != num_experts:
        raise AudioMoEError(f"sources has {len(srcs)} checkpoints; need one per routed expert (num_experts={num_experts})")
    src_layers = [_decoder_layers(s) for s in srcs] if srcs else None
    if src_layers and any(len(sl) != len(decoder) for sl in src_layers):
        raise AudioMoEError("every source checkpoint must have as many decoder layers as the model")
    router_b = router if callable(router) and not isinstance(router, str) else _registry_builder("router", router)
    expert_b = _registry_builder("expert", "swiglu")
    first = _dense_mlp(decoder[0], "layer 0")
    d_model, inter = first.gate_proj.weight.shape[1], first.gate_proj.weight.shape[0]
    width = expert_d_ff or (inter if init == "copy" else inter // num_experts)
    if width < 1:
        raise AudioMoEError(f"expert width {width} < 1: intermediate size {inter} split into {num_experts} experts")
    if average_non_mlp and srcs:
        own = dict(model.named_parameters())
        for name, p in own.items():
            if ".mlp." not in name:
                p.copy_(torch.stack([dict(s.named_parameters())[name].to(p.dtype) for s in srcs]).mean(0))
    ref = next(model.parameters())
    for i in layers if layers is not None else range(len(decoder)):
        dense = _dense_mlp(decoder[i], f"layer {i}")
        moe = MoELayer(
            d_model=d_model,
            num_experts=num_experts,
            router=router_b,
            expert=lambda **kw: expert_b(**{**kw, "d_ff": width}),
            num_null=num_null,
            num_shared=num_shared,
            shared_expert=expert_b,
            shared_d_ff=shared_d_ff or inter,
            shared_mode=shared_mode,
            capacity_factor=capacity_factor,
            backend=backend,
        )
        for e, expert in enumerate(moe.experts):
            mlp = _dense_mlp(src_layers[e][i], f"source {e} layer {i}") if src_layers else dense
            _fill(expert, mlp, e * width if init == "slice" else 0)
        for shared in moe.shared:
            _fill(shared, dense, 0)
        decoder[i].mlp = UpcycledMLP(moe.to(device=ref.device, dtype=ref.dtype))
    _install_mask_hook(model)
    return model
