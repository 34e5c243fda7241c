"""Routers as components: named routers in a preset, gradients, encoder-level routing, the trace."""

from __future__ import annotations

import warnings

import pytest
import torch

import audiomoe
from audiomoe.analysis.trace import RoutingTrace
from audiomoe.core.batch import AudioBatch
from audiomoe.core.errors import AudioMoEError, ConfigError
from audiomoe.routers.functional import make_routing
from audiomoe.testing import build_component, check_preset

NAMED = ["scored", "top_k", "top_p", "dense", "mowe", "uniform", "random", "oracle", "hash"]


def router(name: str, params=None, **context):
    return build_component("router", name, params, {"d_model": 16, "num_experts": 4, **context})


@pytest.mark.parametrize("name", NAMED)
def test_named_router_swaps_into_preset_and_trains(name):
    model = audiomoe.compose("tiny-moe-cls", [f"backbone.moe.router={name}"])
    assert model.spec["backbone"]["params"]["moe"]["params"]["router"]["name"] == name
    assert all(type(b.moe.router).__module__.startswith("audiomoe.routers") for b in model.backbone.blocks)
    batch = AudioBatch(torch.randn(2, 1600) * 0.1, 16000, ["emotion", "speaker"], torch.tensor([1600, 900]), [1, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oracle: the token-level MoE layer passes no task ids
        out = model(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.heads["emotion"].parameters().__next__().grad is not None
    assert set(out.routing) == {"backbone/layer0", "backbone/layer1"}


def test_top_p_preset_passes_the_full_conformance_check():
    report = check_preset("tiny-moe-cls", ("backbone.moe.router=top_p",))
    assert "compose(model.spec) rebuilds identical parameters" in report.checks


def test_every_registered_router_is_covered():
    assert {e.name for e in audiomoe.list_components("router")} >= set(NAMED)


def test_shortcuts_and_slot_overrides_reach_the_selector_and_scorer():
    m = audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=top_p", "backbone.moe.router.p=0.5"])
    r = m.spec["backbone"]["params"]["moe"]["params"]["router"]["params"]
    assert r["selector"]["params"]["p"] == 0.5
    m = audiomoe.compose(
        "tiny-moe-cls",
        [
            "backbone.moe.router=top_k",
            "backbone.moe.router.scorer=mlp",
            "backbone.moe.router.scorer.depth=2",
            "backbone.moe.router.k=1",
        ],
    )
    r = m.spec["backbone"]["params"]["moe"]["params"]["router"]["params"]
    assert r["scorer"] == {"name": "mlp", "params": r["scorer"]["params"]} and r["scorer"]["params"]["depth"] == 2
    assert r["selector"]["params"]["k"] == 1
    rebuilt = audiomoe.compose(m.spec)
    assert rebuilt.spec == m.spec


def test_bad_router_config_is_reported_with_its_key():
    with pytest.raises(ConfigError, match=r"backbone.moe.router.p"):
        audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=top_p", "backbone.moe.router.p=1.5"])
    with pytest.raises(AudioMoEError, match=r"k=8 .*\(4\)"):
        audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=top_k", "backbone.moe.router.k=8"])


def test_nan_input_gives_a_clear_error():
    r = router("top_p")
    with pytest.raises(AudioMoEError, match="NaN"):
        r(torch.full((3, 16), float("nan")))


# -- gradients --------------------------------------------------------------------------------


def test_gradient_reaches_scorer_through_combine_weights():
    r = router("top_p", {"unimoe_aux_weight": 0.0, "unimoe_aux_weight_end": None})
    routing = r(torch.randn(20, 16))
    assert routing.aux_losses == {}
    (routing.weights * torch.randn_like(routing.weights)).sum().backward()
    g = r.scorer.layers[0].weight.grad
    assert g is not None and g.abs().sum() > 0


@pytest.mark.parametrize(
    "params, key",
    [
        ({"balance_weight": 0.1}, "balance"),
        ({"balance_weight": 0.0, "z_loss_weight": 0.1}, "z_loss"),
        ({"balance_weight": 0.0, "entropy_weight": 0.1}, "entropy"),
    ],
)
def test_gradient_reaches_scorer_through_each_aux_loss(params, key):
    # top-1: the task path (weights = raw P) and each aux loss reach the scorer, each on its own.
    r = router("top_k", {"k": 1, **params})
    routing = r(torch.randn(20, 16))
    assert set(routing.aux_losses) == {key}
    w = r.scorer.layers[0].weight
    task = torch.autograd.grad((routing.weights * torch.randn(20, 4)).sum(), w, retain_graph=True)[0]
    assert task.abs().max() > 1e-3
    g = torch.autograd.grad(routing.aux_losses[key], w)[0]
    assert g.abs().max() > 1e-4


def test_gradient_reaches_scorer_through_unimoe_aux_loss():
    # P~ is renormalised over the selected set, so the loss has a gradient once items pick >= 2.
    r = router("top_p", {"p": 0.9})
    routing = r(torch.randn(20, 16))
    assert set(routing.aux_losses) == {"unimoe_aux"} and routing.mask.sum(-1).max() >= 2
    g = torch.autograd.grad(routing.aux_losses["unimoe_aux"], r.scorer.layers[0].weight)[0]
    assert g.abs().sum() > 0


def test_aux_weight_schedule_moves_only_by_advance_schedule():
    r = router("top_p")
    x = torch.randn(8, 16)
    assert r.aux_weight().item() == pytest.approx(0.025)
    r.eval()
    r(x)
    assert int(r.step) == 0
    r.train()
    for _ in range(3):
        r(x)
    assert int(r.step) == 0  # forwards (training ones too) never move a schedule
    for _ in range(3):
        r.advance_schedule()
    assert int(r.step) == 3
    r.set_step(5000)
    assert r.aux_weight().item() == pytest.approx(0.013)
    out = r(x)
    assert "unimoe_aux" in out.aux_losses and "balance" not in out.aux_losses


def test_generation_mode_skips_aux_losses_only_inside_it_and_keeps_the_selection():
    from audiomoe.core.decoding import generation_mode, is_generating

    r = router("top_k", {"balance_weight": 1.0, "z_loss_weight": 1.0, "unimoe_aux_weight": 1.0, "entropy_weight": 1.0})
    r.eval()
    x = torch.randn(6, 16)
    full = r(x)
    assert set(full.aux_losses) == {"balance", "z_loss", "unimoe_aux", "entropy"}
    with pytest.raises(RuntimeError), generation_mode():
        assert is_generating()
        lean = r(x)
        raise RuntimeError("leaving the block by an error resets the mode")
    assert lean.aux_losses == {} and not is_generating()
    assert (
        torch.equal(lean.mask, full.mask)
        and torch.equal(lean.weights, full.weights)
        and torch.equal(lean.indices, full.indices)
    )
    assert set(r(x).aux_losses) == set(full.aux_losses)


def test_padded_items_are_excluded_from_losses_and_selection():
    r = router("top_k", {"balance_weight": 1.0, "z_loss_weight": 1.0, "unimoe_aux_weight": 1.0})
    r.eval()
    x = torch.randn(6, 16)
    mask = torch.tensor([True, True, True, False, False, False])
    a = r(x, item_mask=mask)
    b = r(torch.cat([x[:3], 100 * torch.randn(3, 16)]), item_mask=mask)  # change only padded items
    for k in a.aux_losses:
        torch.testing.assert_close(a.aux_losses[k], b.aux_losses[k])
    assert not a.mask[3:].any() and a.counts.sum() == 3 * 2


def test_training_noise_changes_routing_only_in_training():
    r = router("top_k", {"input_jitter": 0.5, "logit_noise": 5.0})
    x = torch.randn(50, 16)
    r.eval()
    assert torch.equal(r(x).logits, r(x).logits)
    r.train()
    assert not torch.equal(r(x).logits, r(x).logits)


# -- encoder-level routing over [B, T, D] -------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_sequence_routing_pools_valid_frames_only(pooling):
    r = router(
        "mowe",
        {"scorer": {"name": "combined", "params": {"dependent": {"name": "mlp", "params": {"pooling": pooling}}}}},
        task_names=["asr", "emotion"],
    )
    r.eval()
    x = torch.randn(3, 7, 16)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[1, 4:] = False
    valid[2] = False  # an all-padded sample
    a = r(x, item_mask=valid, task_ids=torch.tensor([0, 1, 0]))
    x2 = x.clone()
    x2[1, 4:] = 1e3  # padded frames must not matter
    b = r(x2, item_mask=valid, task_ids=torch.tensor([0, 1, 0]))
    assert a.item_shape == (3,) and a.logits.shape == (3, 4)
    torch.testing.assert_close(a.logits[:2], b.logits[:2])
    assert a.mask[:2].sum(-1).tolist() == [1, 1] and not a.mask[2].any()
    assert a.item_mask.tolist() == [True, True, False]
    assert torch.isfinite(a.logits).all()
    if pooling == "mean":  # mean of valid frames == routing that sample's truncated sequence
        c = r(x[1:2, :4], task_ids=torch.tensor([1]))
        torch.testing.assert_close(a.logits[1:2], c.logits)


def test_data_independent_scorer_uses_the_task_table():
    r = router(
        "scored",
        {"scorer": {"name": "data_independent", "params": {"init_std": 1.0}}, "selector": "dense"},
        task_names=["a", "b"],
    )
    x = torch.randn(4, 16)
    out = r(x, task_ids=torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(out.logits[0], out.logits[2])
    assert not torch.allclose(out.logits[0], out.logits[1])
    assert torch.equal(r(x).logits[0], r(x).logits[3])  # no task ids: the shared vector alone
    with pytest.raises(AudioMoEError, match="task id 5"):
        r(x, task_ids=torch.tensor([0, 1, 5, 0]))


def test_ablation_scorers_behave_as_documented():
    x = torch.randn(30, 16)
    u = router("uniform")(x)
    torch.testing.assert_close(u.weights, torch.full((30, 4), 0.25))
    o = router("oracle", task_names=["a", "b", "c"])(x, task_ids=torch.arange(30) % 3)
    assert (o.indices[:, 0] == torch.arange(30) % 3).all()
    h = router("hash")
    assert torch.equal(h(x).indices, h(x.clone()).indices) and h(x).mask.sum(-1).eq(1).all()
    r1, r2 = router("random"), router("random")
    a1, a2 = r1(x), r1(x)
    assert torch.equal(a1.mask, r2(x).mask) and not torch.equal(a1.mask, a2.mask)
    with pytest.raises(AudioMoEError, match="needs task ids"):
        router("oracle", {"scorer": {"name": "oracle", "params": {"require_task_ids": True}}})(x)


# -- trace ------------------------------------------------------------------------------------


def test_trace_from_model_output_per_sample_and_layer():
    model = audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=top_p"])
    wav = torch.randn(3, 8000) * 0.1
    out = model(AudioBatch(wav, 16000, ["emotion", "speaker", "emotion"], torch.tensor([8000, 6000, 3000]), [0, 1, 2]))
    trace = RoutingTrace.from_output(out)
    assert set(trace.layers) == {"backbone/layer0", "backbone/layer1"}
    lt = trace.layers["backbone/layer0"]
    assert lt.ids.dim() == 3 and lt.ids.shape[0] == 3 and not lt.ids.requires_grad and lt.ids.device.type == "cpu"
    assert lt.valid[0].sum() > lt.valid[1].sum() > lt.valid[2].sum()
    s = trace.sample(2)["backbone/layer0"]
    assert (s["ids"][~s["valid"]] == -1).all()
    valid_w = s["weights"][s["valid"]].sum(-1)
    torch.testing.assert_close(valid_w, torch.ones_like(valid_w))
    summ = trace.summary()["backbone/layer0"]
    assert 1.0 <= summ["experts_per_item"] <= 4.0 and summ["load_max_over_mean"] >= 1.0
    both = RoutingTrace.cat([trace, trace])
    assert both.batch_size == 6 and both.summary()["backbone/layer0"]["items"] == 2 * summ["items"]


def test_trace_summary_hand_example_with_null_column():
    # 3 columns, the last a null expert; item 0 picks {0, 2}, item 1 picks {1}, item 2 is padded.
    mask = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    weights = torch.tensor([[0.6, 0.0, 0.4], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4]])
    r = make_routing(torch.zeros(3, 3), mask, weights, torch.tensor([True, True, False]))
    r.null_columns = 1
    s = RoutingTrace.from_routing({"enc": r}).summary()["enc"]
    assert s["experts_per_item"] == pytest.approx(1.5)
    assert s["real_experts_per_item"] == pytest.approx(1.0)
    assert s["null_share"] == pytest.approx(1 / 3)
    assert s["load_max_over_mean"] == pytest.approx(1.0)
    assert s["router_entropy"] == pytest.approx(torch.log(torch.tensor(3.0)).item())
