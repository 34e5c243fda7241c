"""Weight interop for the MoE layer: the transformers v5 expert layout and UniMoE-Audio's MoE block.

- transformers v5 (``MixtralExperts``, Qwen-MoE, ...): ``gate_up_proj`` [E, 2F, D], ``down_proj``
  [E, D, F]. :class:`audiomoe.moe.grouped.GroupedSwiGLU` stores exactly these two tensors
  under these names, so ``layer.experts.state_dict()`` loads into a transformers experts module
  (and back) with ``strict=True``; :func:`hf_experts_state` / :func:`load_hf_experts` say so in code.
- UniMoE-Audio (HITsz-TMG/Uni-MoE, ``UniMoE-Audio``; DeepSpeed-MoE naming): one block ``mlp`` holds
  ``gate.weight`` [E_r + E_n + E_s, D] (rows: routed, then null, then shared), routed experts
  ``dynamic_real_moe.<...>.experts.<e>.{gate_proj,up_proj,down_proj}.weight`` and shared experts
  ``fixed_real_moe.<s>.{gate_proj,up_proj,down_proj}.weight``. :data:`UNIMOE_KEY_MAP` documents
  where each goes in an audiomoe :class:`~audiomoe.moe.layer.MoELayer` built with a
  linear-gate router, gated shared experts and SwiGLU experts.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.moe.grouped import GroupedSwiGLU

#: UniMoE-Audio block key (under the block prefix) -> audiomoe MoELayer tensor.
UNIMOE_KEY_MAP = {
    "gate.weight[:E_r + E_n]": "router.scorer.layers.0.weight",
    "gate.weight[E_r + E_n:]": "shared_gate.weight",
    "dynamic_real_moe.*experts.{e}.gate_proj.weight": "experts.gate_up_proj[e, :F]",
    "dynamic_real_moe.*experts.{e}.up_proj.weight": "experts.gate_up_proj[e, F:]",
    "dynamic_real_moe.*experts.{e}.down_proj.weight": "experts.down_proj[e]",
    "fixed_real_moe.{s}.gate_proj.weight": "shared.gate_up_proj[s, :F_s]",
    "fixed_real_moe.{s}.up_proj.weight": "shared.gate_up_proj[s, F_s:]",
    "fixed_real_moe.{s}.down_proj.weight": "shared.down_proj[s]",
}

_ROUTED = re.compile(r"dynamic_real_moe\..*experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARED = re.compile(r"fixed_real_moe\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def hf_experts_state(experts: GroupedSwiGLU) -> dict[str, torch.Tensor]:
    """The experts' tensors under transformers v5 names (``gate_up_proj``, ``down_proj``): the same tensors."""
    return {"gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj}


def load_hf_experts(experts: GroupedSwiGLU, state: Mapping[str, torch.Tensor]) -> None:
    """Load a transformers v5 experts state dict (``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F])."""
    experts.load_state_dict({k: state[k] for k in ("gate_up_proj", "down_proj") if k in state}, strict=True)


def _collect(state: Mapping[str, torch.Tensor], pattern: re.Pattern) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = pattern.search(key)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return out


def _load_group(group: GroupedSwiGLU, found: dict[int, dict[str, torch.Tensor]], what: str) -> None:
    missing = [
        f"{what}.{e}.{p}"
        for e in range(len(group))
        for p in ("gate_proj", "up_proj", "down_proj")
        if p not in found.get(e, {})
    ]
    extra = sorted(set(found) - set(range(len(group))))
    if missing or extra:
        raise AudioMoEError(
            f"UniMoE-Audio state dict does not fit {len(group)} {what} experts: "
            + (f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else "")
            + (f" unexpected expert indices {extra}" if extra else "")
        )
    for e in range(len(group)):
        t = found[e]
        w_in = torch.cat([t["gate_proj"], t["up_proj"]])
        if tuple(w_in.shape) != tuple(group.gate_up_proj.shape[1:]) or tuple(t["down_proj"].shape) != tuple(
            group.down_proj.shape[1:]
        ):
            raise AudioMoEError(
                f"{what} expert {e}: gate/up {tuple(t['gate_proj'].shape)}, down {tuple(t['down_proj'].shape)} do not match "
                f"d_model={group.d_model}, d_ff={group.d_ff} of the layer"
            )
        group.load_expert(e, w_in, t["down_proj"])


@torch.no_grad()
def load_unimoe_block(layer: torch.nn.Module, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Import one UniMoE-Audio MoE block (keys under ``prefix``, e.g. ``model.layers.3.mlp.``) into ``layer``.

    ``layer`` must have a linear-gate router over ``num_experts + num_null`` columns, grouped SwiGLU
    routed experts and, with shared experts, ``shared_mode="gated"`` (the released block gates
    them through the one ``gate``). See :data:`UNIMOE_KEY_MAP`.
    """
    block = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if "gate.weight" not in block:
        raise AudioMoEError(
            f"no '{prefix}gate.weight' in the state dict: not a UniMoE-Audio MoE block under prefix '{prefix}'"
        )
    if not isinstance(layer.experts, GroupedSwiGLU):
        raise AudioMoEError("UniMoE-Audio experts are SwiGLU: build the layer with expert 'swiglu' to import them")
    gate = block["gate.weight"]
    dyn = layer.num_experts + layer.num_null
    if gate.shape[0] != dyn + layer.num_shared:
        raise AudioMoEError(
            f"gate.weight has {gate.shape[0]} rows; the layer has {layer.num_experts} routed + {layer.num_null} null + {layer.num_shared} shared columns"
        )
    scorer = getattr(getattr(layer.router, "scorer", None), "layers", None)
    if scorer is None or len(scorer) != 1:
        raise AudioMoEError("the router must score with one linear gate (scorer 'linear') to take UniMoE-Audio's gate")
    scorer[0].weight.copy_(gate[:dyn])
    if layer.num_shared:
        if layer.shared_gate is None:
            raise AudioMoEError("UniMoE-Audio gates its shared experts: build the layer with shared_mode='gated'")
        layer.shared_gate.weight.copy_(gate[dyn:])
        _load_group(layer.shared, _collect(block, _SHARED), "shared")
    _load_group(layer.experts, _collect(block, _ROUTED), "routed")
