"""The causal_lm backbone: a transformers LM (random or local) as the shared decoder, LoRA, MoE upcycling."""

from __future__ import annotations

import pytest
import torch
import transformers

import audiomoe
from audiomoe.testing import build_component


def backbone(d: int = 32, seed: int = 0, **params):
    torch.manual_seed(seed)
    return build_component("backbone", "causal_lm", params, {"d_model": d}).eval()


def padded(d: int = 32):
    x = torch.randn(2, 7, d)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    return x, pad


def test_dense_lm_backbone_trains_in_a_preset_and_ignores_padding():
    model = audiomoe.compose("tiny-cls", ["backbone=causal_lm"])
    out = model(audiomoe.AudioBatch(torch.randn(2, 8000) * 0.1, 16000, "cls", targets=[0, 1]))
    out.loss.backward()
    grads = [p.grad for n, p in model.backbone.named_parameters() if "layers.0.self_attn.q_proj" in n]
    assert grads and grads[0].abs().max() > 1e-6
    bb = backbone()
    x, pad = padded()
    y = bb(x, pad).hidden
    x2 = x.clone()
    x2[1, 5:] = 100.0
    torch.testing.assert_close(bb(x2, pad).hidden[~pad], y[~pad])
    assert (y[pad] == 0).all()
    # causal: a later frame does not change earlier outputs
    x3 = x.clone()
    x3[0, 6] = -5.0
    torch.testing.assert_close(bb(x3, pad).hidden[0, :6], y[0, :6])


def test_copy_upcycled_lm_equals_the_dense_lm_and_reports_routing():
    dense = backbone()
    moe = backbone(moe={"name": "moe", "params": {"num_experts": 3, "router": {"name": "top_k", "params": {"k": 2}}}})
    x, pad = padded()
    a, b = dense(x, pad), moe(x, pad)
    torch.testing.assert_close(b.hidden, a.hidden, rtol=1e-5, atol=1e-5)  # every expert is a copy, weights sum to 1
    assert set(b.routing) == {"layer0", "layer1"} and {"layer0/balance", "layer1/balance"} <= set(b.aux_losses)
    assert int(b.routing["layer0"].counts.sum()) == 2 * int((~pad).sum())  # top-2 of the valid tokens only


def test_lora_freezes_the_lm_and_trains_the_adapters():
    bb = backbone(lora={"r": 4})
    trainable = [n for n, p in bb.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, pad = padded()
    bb.train()
    bb(x, pad).hidden[~pad].sum().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in bb.named_parameters() if "lora_B" in n)


def test_a_local_lm_of_another_width_gets_linear_maps(tmp_path):
    cfg = transformers.LlamaConfig(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=8,
    )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "lm")
    bb = backbone(pretrained=str(tmp_path / "lm"))
    assert isinstance(bb.into, torch.nn.Linear) and bb.into.out_features == 48
    x, pad = padded()
    assert bb(x, pad).hidden.shape == (2, 7, 32)


def test_bad_backbone_inputs_are_named(tmp_path):
    with pytest.raises(audiomoe.AudioMoEError, match="does not exist"):
        backbone(pretrained=str(tmp_path / "missing"))
    with pytest.raises(audiomoe.AudioMoEError, match="needs 'model_type'"):
        backbone(config={"hidden_size": 32})
    with pytest.raises(audiomoe.ConfigError, match="either 'pretrained'"):
        audiomoe.compose(
            "tiny-cls", ["backbone=causal_lm", "backbone.pretrained=/x", "backbone.config={model_type: llama}"]
        )
