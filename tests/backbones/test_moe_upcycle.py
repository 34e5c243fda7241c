"""Upcycling a tiny random transformers causal LM (Llama / Qwen2) into MoE layers."""

from __future__ import annotations

import pytest
import torch
import transformers

import audiomoe
from audiomoe.backbones.upcycle import UpcycledMLP, moe_aux_losses, upcycle_causal_lm
from audiomoe.core.errors import AudioMoEError

KW = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
)


def tiny(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**KW) if kind == "llama" else transformers.Qwen2Config(**KW)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_copy_upcycled_model_matches_dense_and_trains(kind):
    model = tiny(kind)
    ids = torch.randint(0, 97, (2, 9))
    dense = model(ids).logits
    upcycle_causal_lm(model, {"num_experts": 4, "router": {"name": "top_k", "params": {"k": 2}}})
    assert all(isinstance(layer.mlp, UpcycledMLP) for layer in model.model.layers)
    out = model(ids).logits
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    model.train()
    loss = model(ids, labels=ids).loss + sum(moe_aux_losses(model).values())
    loss.backward()
    moe = model.model.layers[0].mlp.moe
    gate = moe.router.scorer.layers[0].weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert any(p.grad is not None for p in moe.experts.parameters())
    assert set(moe_aux_losses(model)) == {"model.layers.0.mlp/balance", "model.layers.1.mlp/balance"}


def test_each_expert_from_its_own_checkpoint(tmp_path):
    a, b = tiny(seed=1), tiny(seed=2)
    a.save_pretrained(tmp_path / "a")
    base = tiny(seed=3)
    upcycle_causal_lm(
        base,
        {"num_experts": 3, "num_shared": 1, "num_null": 1},
        sources=[tmp_path / "a", b, tmp_path / "a"],
        average_non_mlp=True,
    )
    for i, layer in enumerate(base.model.layers):
        moe = layer.mlp.moe
        for e, src in enumerate([a, b, a]):
            mlp = src.model.layers[i].mlp
            w_in, w_out = moe.experts.gate_up_proj[e], moe.experts.down_proj[e]
            torch.testing.assert_close(w_in, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            torch.testing.assert_close(w_out, mlp.down_proj.weight)
        assert moe.num_null == 1 and len(moe.shared) == 1
    mean = (2 * a.model.layers[0].self_attn.q_proj.weight + b.model.layers[0].self_attn.q_proj.weight) / 3
    torch.testing.assert_close(base.model.layers[0].self_attn.q_proj.weight, mean)
    ids = torch.randint(0, 97, (1, 5))
    base(ids, labels=ids).loss.backward()


def test_slice_init_gives_fine_grained_experts_that_sum_to_dense():
    model = tiny()
    dense_mlp = model.model.layers[0].mlp
    x = torch.randn(5, 32)
    want = dense_mlp(x)
    upcycle_causal_lm(
        model,
        {
            "num_experts": 4,
            "router": {
                "name": "top_k",
                "params": {"k": 4, "selector": {"name": "top_k", "params": {"normalize": False}}},
            },
        },
        init="slice",
    )
    moe = model.model.layers[0].mlp.moe
    assert moe.experts.d_ff == 16
    # the slices partition the intermediate dimension: the unweighted sum of all experts is the dense MLP
    torch.testing.assert_close(moe.experts.forward_all(x), want, rtol=1e-5, atol=1e-5)


def test_bad_upcycling_inputs_are_named(tmp_path):
    with pytest.raises(AudioMoEError, match="one per routed expert"):
        upcycle_causal_lm(tiny(), {"num_experts": 2}, sources=[tiny()])
    with pytest.raises(AudioMoEError, match="not a local directory"):
        upcycle_causal_lm(tiny(), {"num_experts": 1}, sources=[tmp_path / "missing"])
    gelu = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**KW, hidden_act="gelu"))
    with pytest.raises(AudioMoEError, match="SiLU"):
        upcycle_causal_lm(gelu, {"num_experts": 2})


def test_padded_tokens_are_not_routed_in_forward_or_generate():
    model = tiny()
    upcycle_causal_lm(model, {"num_experts": 4, "router": {"name": "top_k", "params": {"k": 2}}})
    ids = torch.randint(1, 97, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # right padding
    padded = model(ids, attention_mask=mask).logits
    moe = model.model.layers[0].mlp.moe
    assert moe.last_stats["tokens"] == 11 and int(moe.last_stats["routed_pairs"]) == 22
    r = model.model.layers[1].mlp.routing
    assert int(r.counts.sum()) == 22 and r.item_mask is not None and not r.item_mask[11:].any()
    assert model.model.layers[0].mlp.attention_mask is None  # cleared after the call
    short = model(ids[1:, :4]).logits  # the same sample without padding
    torch.testing.assert_close(padded[1, :4], short[0], rtol=1e-5, atol=1e-5)
    assert moe.last_stats["tokens"] == 4  # no mask given: every token routed
    # left-padded generation with a KV cache: the per-step mask is the last columns of the full mask
    left = torch.ones(2, 5, dtype=torch.long)
    left[0, :2] = 0
    gen = model.generate(ids[:, :5], attention_mask=left, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (2, 8)
    assert moe.last_stats["tokens"] == 2  # the last step routes one new token per sample


def test_upcycling_keeps_every_moe_option():
    """No silent defaults: the upcycled layers carry exactly the options of the moe spec given."""
    spec = {
        "num_experts": 4,
        "num_null": 1,
        "num_shared": 1,
        "shared_mode": "unit",
        "router": {"name": "top_p", "params": {"p": 0.6}},
        "capacity_factor": 1.5,
        "drop_policy": "probs",
        "min_capacity": 3,
        "capacity_basis": "tokens",
        "renormalize_drops": True,
        "null_capacity": True,
        "dispatch": "loop",
    }
    model = tiny()
    upcycle_causal_lm(model, spec)
    moe = model.model.layers[1].mlp.moe
    got = moe.params.model_dump()
    for key, value in spec.items():
        if key != "router":
            assert got[key] == value, key
    assert moe.router.audiomoe_component.name == "top_p" and type(moe.router.selector).__name__ == "TopP"
    assert moe.router.selector.params.p == 0.6
    assert moe.shared.d_ff == 64 and moe.experts.d_ff == 64  # dense width for copies and the shared expert
    ids = torch.randint(0, 97, (2, 9))
    model.train()
    model(ids, labels=ids).loss.backward()
    assert moe.last_plan == "loop" and moe.last_stats["capacity"] >= 3
    with pytest.raises(audiomoe.ConfigError, match="capacity_factor"):
        upcycle_causal_lm(tiny(), {"num_experts": 2, "capacity_factor": -1})
