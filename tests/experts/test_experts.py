"""Expert kinds and the MoE backbones (moe_transformer, unimoe_transformer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import audiomoe
from audiomoe.core.errors import AudioMoEError
from audiomoe.testing import check_component


def build(kind, name, **ctx):
    return audiomoe.component_builder(kind, name)(**ctx)


def test_swiglu_is_the_default_expert_and_computes_the_formula():
    assert audiomoe.get_registry().get_component("expert", None).name == "swiglu"
    e = build("expert", "swiglu", d_model=8)
    assert e.d_ff == 32 and all(m.bias is None for m in (e.w_in, e.w_out))
    x = torch.randn(5, 8)
    g, u = e.w_in.weight[:32], e.w_in.weight[32:]
    torch.testing.assert_close(e(x), (F.silu(x @ g.t()) * (x @ u.t())) @ e.w_out.weight.t())
    assert build("expert", "swiglu", d_model=8, d_ff=12).d_ff == 12  # parent-injected width wins
    assert build("expert", "mlp", d_model=8, d_ff=12).fc1.out_features == 12
    check_component("expert", "swiglu")


@pytest.mark.parametrize("name", ["moe_transformer", "unimoe_transformer"])
def test_backbones_ignore_padding_and_report_routing(name):
    torch.manual_seed(0)
    bb = build("backbone", name, d_model=16)
    x = torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    out = bb(x, pad)
    assert out.hidden.shape == x.shape and set(out.routing) == {"layer0", "layer1"}
    x2 = x.clone()
    x2[0, 4:] = 50.0
    torch.testing.assert_close(bb(x2, pad).hidden[~pad], out.hidden[~pad])
    r = out.routing["layer0"]
    assert r.mask.reshape(2, 6, -1)[0, 4:].sum() == 0 and r.item_shape == (2, 6)
    assert out.aux_losses and all(torch.isfinite(v) for v in out.aux_losses.values())
    out.hidden[~pad].sum().backward()


def test_unimoe_layout_and_active_parameters():
    model = audiomoe.compose("tiny-moe-cls", overrides=["backbone=unimoe_transformer", "backbone.moe.num_experts=6"])
    moe = model.backbone.blocks[0].moe
    assert (moe.num_experts, moe.num_null, moe.num_shared, moe.params.shared_mode) == (6, 1, 2, "gated")
    assert moe.router(torch.randn(3, 32)).mask.shape == (3, 7)  # routed + null columns
    total, _ = audiomoe.count_parameters(model)
    bb = model.backbone
    bb(torch.randn(2, 10, 32), torch.zeros(2, 10, dtype=torch.bool))
    per_expert = sum(p.numel() for p in moe.experts.parameters()) / 6  # grouped: one stacked tensor pair
    picks = moe.last_stats["routed_per_token"]
    assert 0 <= picks <= 6
    _, active = audiomoe.count_parameters(model)
    expected_cut = sum((6 - b.moe.last_stats["routed_per_token"]) * per_expert for b in bb.blocks)
    assert active == pytest.approx(total - expected_cut)


def test_moe_transformer_options_reach_every_layer():
    model = audiomoe.compose(
        "tiny-moe-cls",
        overrides=[
            "backbone.moe.num_null=2",
            "backbone.moe.num_shared=1",
            "backbone.moe.shared_mode=unit",
            "backbone.moe.capacity_factor=1.0",
            "backbone.moe.expert=swiglu",
        ],
    )
    for b in model.backbone.blocks:
        assert (b.moe.num_null, b.moe.num_shared, b.moe.params.shared_mode, b.moe.params.capacity_factor) == (
            2,
            1,
            "unit",
            1.0,
        )
    bb = model.backbone
    out = bb(torch.randn(3, 20, 32), torch.zeros(3, 20, dtype=torch.bool))
    assert out.routing["layer0"].null_columns == 2
    assert bb.blocks[0].moe.last_stats["capacity"] > 0


def test_capacity_options_reach_every_layer_and_drops_show_in_the_trace():
    from audiomoe.analysis.trace import RoutingTrace

    model = audiomoe.compose(
        "tiny-moe-cls",
        overrides=[
            "backbone.moe.capacity_factor=0.3",
            "backbone.moe.capacity_basis=tokens",
            "backbone.moe.renormalize_drops=true",
            "backbone.moe.min_capacity=2",
            "backbone.moe.drop_policy=probs",
        ],
    )
    for b in model.backbone.blocks:
        m = b.moe.params
        assert (m.capacity_basis, m.renormalize_drops, m.min_capacity, m.drop_policy) == ("tokens", True, 2, "probs")
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[2, 12:] = True
    out = model.backbone(torch.randn(3, 20, 32), pad)
    trace = RoutingTrace.from_routing(out.routing, 3)
    layer0 = model.backbone.blocks[0].moe
    assert layer0.last_stats["capacity"] == max(2, -(-0.3 * 52 // (layer0.num_experts + layer0.num_null)))
    summary = trace.summary()["layer0"]
    assert summary["dropped_share"] > 0
    assert int(trace.layers["layer0"].dropped.sum()) == layer0.last_stats["dropped_pairs"]
    assert trace.sample(2)["layer0"]["dropped"][12:].sum() == 0  # padding is never routed, so never dropped
    assert RoutingTrace.cat([trace, trace]).layers["layer0"].dropped.shape == (6, 20)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_xformers_packed_attention_matches_torch():
    from audiomoe.moe.backends import attention, xformers_available

    if not xformers_available():
        pytest.skip("xformers not installed")
    q, k, v = (torch.randn(2, 9, 2, 16, device="cuda") for _ in range(3))
    pad = torch.zeros(2, 9, dtype=torch.bool, device="cuda")
    pad[1, 5:] = True
    a = attention(q, k, v, pad, "torch")
    b = attention(q, k, v, pad, "xformers")
    torch.testing.assert_close(a[~pad], b[~pad], rtol=2e-3, atol=2e-3)


def test_moe_backbone_runs_causally_and_serves_as_the_codec_decoder():
    import audiomoe
    from audiomoe.testing import build_component

    torch.manual_seed(0)
    bb = build_component("backbone", "unimoe_transformer", {"num_layers": 2, "num_heads": 2}, {"d_model": 16})
    bb.eval()
    x = torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    full = bb(x, pad, causal=True).hidden
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 3, 16)
    # Positions before the change cannot see it; the non-causal stack does.
    assert torch.allclose(bb(changed, pad, causal=True).hidden[:, :4], full[:, :4], atol=1e-5)
    assert not torch.allclose(bb(changed, pad).hidden[:, :4], bb(x, pad).hidden[:, :4], atol=1e-5)
    # The codec head accepts the MoE stack (top-p, shared and null experts) as its decoder.
    model = audiomoe.compose(
        "tiny-codec", ["tasks.codec.decoder=unimoe_transformer", "tasks.codec.decoder.num_heads=2"]
    )
    from audiomoe.testing import check_preset

    assert (
        "compose(model.spec) rebuilds identical parameters"
        in check_preset(
            "tiny-codec", ("tasks.codec.decoder=unimoe_transformer", "tasks.codec.decoder.num_heads=2")
        ).checks
    )
    assert any(
        k.startswith("layer")
        for k in model.heads["codec"]
        .decoder(torch.randn(1, 3, model.params.d_model), torch.zeros(1, 3, dtype=torch.bool), causal=True)
        .routing
    )


def test_task_ids_reach_the_backbone_routers(recwarn):
    """Token-level oracle routing: every valid token of a sample goes to its task's expert, no warning."""
    from audiomoe.analysis.trace import RoutingTrace
    from audiomoe.data.synthetic import tone_batch

    model = audiomoe.compose("tiny-moe-cls", overrides=["backbone.moe.router=oracle"])
    model.eval()
    batch = tone_batch({"emotion": 4, "speaker": 8}, 6, generator=torch.Generator().manual_seed(3))
    assert len(set(batch.tasks)) == 2
    out = model(batch)
    assert not [w for w in recwarn if "task ids" in str(w.message)]
    trace = RoutingTrace.from_output(out)
    for i, task in enumerate(batch.tasks):
        column = model.task_names.index(task)  # oracle default: task t -> column t mod E
        layer = trace.sample(i)["backbone/layer1"]
        assert torch.all(layer["ids"][layer["valid"], 0] == column)
    # a layer called directly with per-sample task ids gives the same routing as the model
    x = torch.randn(2, 5, 32)
    _, r = model.backbone.blocks[0].moe(x, None, torch.tensor([1, 0]))
    assert r.indices[:5, 0].tolist() == [1] * 5 and r.indices[5:, 0].tolist() == [0] * 5
    with pytest.raises(AudioMoEError, match="task_ids"):
        model.backbone.blocks[0].moe(x, None, torch.tensor([1, 0, 1]))
