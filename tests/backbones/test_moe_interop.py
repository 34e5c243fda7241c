"""Weights in and out of the MoE layer: transformers v5 ``MixtralExperts`` and UniMoE-Audio's block layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import audiomoe
from audiomoe.backbones.interop import hf_experts_state, load_hf_experts, load_unimoe_block
from audiomoe.core.interfaces import Routing

from helpers.unimoe_reference import unimoe_block

D, F_, E, K = 16, 8, 4, 2


def moe(d_model: int = D, **params):
    return audiomoe.component_builder("moe", {"name": "moe", "params": params})(d_model=d_model)


def hf_experts(impl: str = "eager") -> MixtralExperts:
    cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E, hidden_act="silu")
    cfg._experts_implementation = impl
    torch.manual_seed(1)
    experts = MixtralExperts(cfg)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    return experts


def topk_routing(x: torch.Tensor) -> tuple[Routing, torch.Tensor, torch.Tensor]:
    logits = x @ torch.randn(D, E, generator=torch.Generator().manual_seed(2))
    probs = logits.softmax(-1)
    top_w, top_i = probs.topk(K, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top_i, True)
    weights = torch.zeros_like(probs).scatter(-1, top_i, top_w)
    return Routing(logits, mask, weights, top_i, mask.sum(0)), top_i, top_w


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_experts_load_from_and_into_transformers_mixtral_experts(impl):
    hf = hf_experts(impl)
    layer = moe(expert={"name": "swiglu", "params": {"d_ff": F_}}, num_experts=E)
    assert set(layer.experts.state_dict()) == set(hf.state_dict()) == {"gate_up_proj", "down_proj"}
    load_hf_experts(layer.experts, hf.state_dict())
    x = torch.randn(30, D)
    routing, top_i, top_w = topk_routing(x)
    ours = layer.combine(x, routing)
    theirs = hf(x, top_i, top_w)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # and back: our weights into a fresh transformers module, strict, same outputs
    fresh = hf_experts(impl)
    fresh.load_state_dict({k: v.detach() for k, v in hf_experts_state(layer.experts).items()}, strict=True)
    torch.testing.assert_close(fresh(x, top_i, top_w), ours, rtol=1e-5, atol=1e-5)


def unimoe_state(
    prefix: str, e_r: int = 8, e_n: int = 1, e_s: int = 2, f: int = 8, f_s: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A tiny random state dict in UniMoE-Audio's MoE block key layout (DeepSpeed-MoE naming)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    state = {f"{prefix}gate.weight": r(e_r + e_n + e_s, D)}
    for e in range(e_r):
        base = f"{prefix}dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.{e}."
        state |= {
            base + "gate_proj.weight": r(f, D),
            base + "up_proj.weight": r(f, D),
            base + "down_proj.weight": r(D, f),
        }
    for s in range(e_s):
        base = f"{prefix}fixed_real_moe.{s}."
        state |= {
            base + "gate_proj.weight": r(f_s, D),
            base + "up_proj.weight": r(f_s, D),
            base + "down_proj.weight": r(D, f_s),
        }
    state[f"{prefix}dynamic_real_moe.deepspeed_moe.gate.wg.weight"] = r(1, D)  # unrelated keys are ignored
    return state


def unimoe_layer():
    router = {
        "name": "top_p",
        "params": {
            "unimoe_aux_weight": 0.0,
            "unimoe_aux_weight_end": None,
            "selector": {"name": "top_p", "params": {"p": 0.7, "weights": "unimoe_code"}},
        },
    }
    return moe(
        router=router,
        expert={"name": "swiglu", "params": {"d_ff": 8}},
        num_experts=8,
        num_null=1,
        num_shared=2,
        shared_mode="gated",
        shared_d_ff=4,
    )


def test_unimoe_audio_block_imports_with_the_documented_key_map():
    prefix = "model.layers.3.mlp."
    state = unimoe_state(prefix)
    layer = unimoe_layer().eval()
    load_unimoe_block(layer, state, prefix)

    # the reference block built by hand from the same tensors, as the released code computes it
    def ffn(p):
        def run(t):
            return F.linear(
                F.silu(F.linear(t, state[p + "gate_proj.weight"])) * F.linear(t, state[p + "up_proj.weight"]),
                state[p + "down_proj.weight"],
            )

        return run

    experts = [ffn(f"{prefix}dynamic_real_moe.deepspeed_moe.experts.deepspeed_experts.{e}.") for e in range(8)]
    shared = [ffn(f"{prefix}fixed_real_moe.{s}.") for s in range(2)]
    x = torch.randn(50, D)
    ref = unimoe_block(x, state[f"{prefix}gate.weight"], experts, shared, num_null=1, training=False)
    with torch.no_grad():
        y, routing = layer(x)
    torch.testing.assert_close(routing.mask, ref["mask"])
    torch.testing.assert_close(y, ref["y"], rtol=1e-5, atol=1e-5)
    assert int(ref["k"].max()) > 1  # a real top-p mix, not all single picks


def test_unimoe_import_names_what_does_not_fit():
    prefix = "mlp."
    state = unimoe_state(prefix)
    del state[f"{prefix}fixed_real_moe.1.down_proj.weight"]
    with pytest.raises(audiomoe.AudioMoEError, match=r"missing \['shared.1.down_proj'\]"):
        load_unimoe_block(unimoe_layer(), state, prefix)
    with pytest.raises(
        audiomoe.AudioMoEError, match="gate.weight has 11 rows; the layer has 8 routed \\+ 0 null \\+ 2 shared"
    ):
        load_unimoe_block(
            moe(num_experts=8, num_shared=2, expert={"name": "swiglu", "params": {"d_ff": 8}}, shared_d_ff=4),
            unimoe_state(prefix),
            prefix,
        )
    with pytest.raises(audiomoe.AudioMoEError, match="not a UniMoE-Audio MoE block under prefix 'other.'"):
        load_unimoe_block(unimoe_layer(), unimoe_state(prefix), "other.")
    with pytest.raises(audiomoe.AudioMoEError, match="do not match d_model=16, d_ff=8"):
        load_unimoe_block(unimoe_layer(), unimoe_state(prefix, f=6), prefix)
