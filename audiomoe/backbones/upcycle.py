"""Sparse upcycling: turn the dense SwiGLU MLPs of a transformers causal LM into MoE layers.

Komatsuzaki et al. 2023 ("Sparse Upcycling") copy the dense FFN into every expert; UniMoE-Audio's
stage 2 builds the MoE from several dense *specialists*: expert ``e`` comes from checkpoint
``sources[e]``, and (optionally) attention and norms are the average of the specialists. DCMoE's
``--moe_copy`` variant fills fine-grained experts with consecutive slices of the dense intermediate
dimension (``init="slice"``). Works for models whose decoder layers hold ``mlp.gate_proj``,
``mlp.up_proj``, ``mlp.down_proj`` with a SiLU activation (Llama, Qwen2, Qwen2.5, Mistral, ...).

The MoE layers are built from one ``moe`` spec (the ``moe`` component's params: router, experts,
null and shared experts, capacity, dispatch), exactly as a backbone builds them, so no option is
lost or given another default here. With ``init="copy"``, no null experts, no shared experts and a
router whose weights sum to 1 over the picks (e.g. ``top_k`` with ``normalize`` and k > 1),
the upcycled model computes exactly the dense model.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Routing
from audiomoe.moe.grouped import GroupedSwiGLU
from audiomoe.moe.layer import MoELayer

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
        self.padded: Optional[bool] = None  # whether the call's mask has a padded position (None: not known)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the MoE FFN to ``hidden_states`` [B, T, D] (padding from the hooked ``attention_mask``)."""
        pad = None
        mask = self.attention_mask
        if (
            mask is not None
            and mask.dim() == 2
            and hidden_states.dim() == 3
            and mask.shape[0] == hidden_states.shape[0]
        ):
            t = hidden_states.shape[1]
            # with a KV cache the mask covers past + current: the current are last; a no-grad call of an unpadded
            # batch (a decoding step) runs unmasked: the same output in fewer ops (padding read once per model call)
            if mask.shape[1] >= t and (torch.is_grad_enabled() or self.padded is not False):
                pad = mask[:, -t:].to(hidden_states.device) == 0
        y, self.routing = self.moe(hidden_states, pad)
        return y


def upcycled_mlps(model: nn.Module) -> tuple[UpcycledMLP, ...]:
    """The :class:`UpcycledMLP` s of ``model`` in module order, found once and kept on the model.

    A decoding step is a few milliseconds and a walk over every module of the LM is a sizeable part of
    it (twice per call, in the mask hooks). The tuple lives in the model's ``__dict__``: a deep copy maps
    it onto the copy's own modules; :func:`upcycle_causal_lm` drops it when it replaces MLPs.
    """
    found = model.__dict__.get("_audiomoe_upcycled")
    if found is None:
        found = model.__dict__["_audiomoe_upcycled"] = tuple(m for m in model.modules() if isinstance(m, UpcycledMLP))
    return found


def _install_mask_hook(model: nn.Module) -> None:
    """Give every :class:`UpcycledMLP` the 2-D ``attention_mask`` of each ``model(...)`` call (once per model)."""
    model.__dict__.pop("_audiomoe_upcycled", None)  # MLPs were (re)placed: found again on the next call
    if getattr(model, "_audiomoe_mask_hooks", None):
        return

    # the hooks use the module they are called with (not a closure), so a deep copy stays separate
    def before(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        mask = mask if isinstance(mask, torch.Tensor) else None
        # read once per call, not once per layer (a host sync on CUDA); only no-grad calls use it
        padded = None if mask is None or torch.is_grad_enabled() else bool((mask == 0).any())
        for m in upcycled_mlps(module):
            m.attention_mask, m.padded = mask, padded

    def after(module, _args, _kwargs, _output):
        for m in upcycled_mlps(module):
            m.attention_mask, m.padded = None, None

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


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise AudioMoEError(
            f"{type(model).__name__} has no .model.layers: upcycling supports Llama/Qwen2-style causal LMs"
        )
    return layers


def _dense_mlp(layer: nn.Module, where: str) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        raise AudioMoEError(f"{where}.mlp is not a gated (gate_proj/up_proj/down_proj) MLP; cannot upcycle it")
    act = getattr(mlp, "act_fn", None)
    probe = torch.linspace(-6, 6, 25, device="cpu")  # explicit: the composer may build on the meta device
    # transformers has its own activation classes: compare values, not types
    if act is not None and not torch.allclose(act(probe), torch.nn.functional.silu(probe), atol=1e-6):
        raise AudioMoEError(
            f"{where}.mlp uses {type(act).__name__}; upcycling into SwiGLU experts needs SiLU (hidden_act='silu')"
        )
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
def _fill(experts: GroupedSwiGLU, e: int, mlp: nn.Module, offset: int) -> None:
    """Copy rows ``[offset, offset + d_ff)`` (cyclic) of the dense intermediate dimension into expert ``e``."""
    f = experts.d_ff
    inter = mlp.gate_proj.weight.shape[0]
    rows = (torch.arange(f) + offset) % inter
    w_in = torch.cat([mlp.gate_proj.weight[rows], mlp.up_proj.weight[rows]])
    experts.load_expert(e, w_in, mlp.down_proj.weight[:, rows])


def _moe_spec(moe: Any, width: int, inter: int) -> dict[str, Any]:
    """The ``moe`` spec with SwiGLU experts of ``width`` and shared experts of the dense width unless given."""
    spec = (
        {"name": "moe", "params": {}}
        if moe is None
        else (moe.model_dump() if hasattr(moe, "model_dump") else dict(moe))
    )
    if "name" not in spec:
        spec = {"name": "moe", "params": spec}
    params = dict(spec.get("params") or {})
    expert = params.get("expert", "swiglu")
    expert = (
        {"name": expert, "params": {}}
        if isinstance(expert, str)
        else {"name": expert.get("name", "swiglu"), "params": dict(expert.get("params") or {})}
    )
    if expert["name"] != "swiglu":
        raise AudioMoEError(
            f"upcycling copies dense SwiGLU MLPs into experts: moe.expert must be 'swiglu', got '{expert['name']}'"
        )
    # None is "unset" too: a spec resolved by the composer carries every default, d_ff=None included
    if expert["params"].get("d_ff") is None:
        expert["params"]["d_ff"] = width
    params["expert"] = expert
    if params.get("shared_d_ff") is None:
        params["shared_d_ff"] = inter
    return {"name": spec["name"], "params": params}


@torch.no_grad()
def upcycle_causal_lm(
    model: nn.Module,
    moe: Any = None,
    *,
    sources: Optional[Sequence[Source]] = None,
    init: Literal["copy", "slice"] = "copy",
    average_non_mlp: bool = False,
    layers: Optional[Sequence[int]] = None,
) -> nn.Module:
    """Replace the dense MLPs of ``model`` (in place) by MoE layers initialised from dense weights.

    Args:
        model: a transformers causal LM with Llama/Qwen2-style decoder layers.
        moe: the ``moe`` component's spec (``{"num_experts": 8, "router": "top_p", "num_null": 1, ...}``
            or ``{"name": "moe", "params": {...}}``), validated like any config: every MoE option
            (capacity, drops, shared mode, dispatch) applies as in a backbone. Experts must be
            ``swiglu``; their width defaults to the dense intermediate size (``copy``) or
            ``intermediate // num_experts`` (``slice``); shared experts default to the dense width.
            Routers are new and randomly initialised, as in UniMoE.
        sources: one dense checkpoint per routed expert (in-memory models or local directories in
            Hugging Face layout); expert ``e`` is initialised from ``sources[e]``. Default: ``model``.
        init: ``"copy"`` = each expert is the whole dense MLP (slices taken cyclically when an
            explicit ``d_ff`` is narrower); ``"slice"`` = fine-grained experts, expert ``e`` takes the
            ``e``-th consecutive slice of the intermediate dimension (DCMoE ``--moe_copy``).
            Shared experts are initialised from ``model``'s own MLP (slice at offset 0 when narrower).
        average_non_mlp: set every non-MLP parameter to the mean over ``sources`` (UniMoE stage 2).
        layers: indices of the decoder layers to upcycle (default: all).

    Returns ``model`` (its ``mlp`` modules are now :class:`UpcycledMLP`; a forward hook passes the
    ``attention_mask`` of each call to them, so padded tokens are not routed).
    """
    from audiomoe.core.composer import component_builder

    decoder = _decoder_layers(model)
    first = _dense_mlp(decoder[0], "layer 0")
    d_model, inter = first.gate_proj.weight.shape[1], first.gate_proj.weight.shape[0]
    num_experts = component_builder("moe", _moe_spec(moe, 1, inter)).node.params.num_experts  # validates every option
    width = inter if init == "copy" else inter // num_experts
    if width < 1:
        raise AudioMoEError(f"expert width {width} < 1: intermediate size {inter} split into {num_experts} experts")
    builder = component_builder("moe", _moe_spec(moe, width, inter))
    srcs = [_load(s) for s in sources] if sources is not None else None
    if srcs is not None and len(srcs) != num_experts:
        raise AudioMoEError(
            f"sources has {len(srcs)} checkpoints; need one per routed expert (num_experts={num_experts})"
        )
    src_layers = [_decoder_layers(s) for s in srcs] if srcs else None
    if src_layers and any(len(sl) != len(decoder) for sl in src_layers):
        raise AudioMoEError("every source checkpoint must have as many decoder layers as the model")
    if average_non_mlp and srcs:
        own = dict(model.named_parameters())
        for name, p in own.items():
            if ".mlp." not in name:
                p.copy_(torch.stack([dict(s.named_parameters())[name].to(p.dtype) for s in srcs]).mean(0))
    ref = next(model.parameters())
    for i in layers if layers is not None else range(len(decoder)):
        dense = _dense_mlp(decoder[i], f"layer {i}")
        layer = builder(d_model=d_model)
        for e in range(num_experts):
            mlp = _dense_mlp(src_layers[e][i], f"source {e} layer {i}") if src_layers else dense
            _fill(layer.experts, e, mlp, e * layer.experts.d_ff if init == "slice" else 0)
        for s in range(layer.num_shared):
            _fill(layer.shared, s, dense, 0)
        decoder[i].mlp = UpcycledMLP(layer.to(device=ref.device, dtype=ref.dtype))
    _install_mask_hook(model)
    return model
