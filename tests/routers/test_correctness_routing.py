"""Issue 10, routing side: routers learn from the task, UniMoE-exact edges, capacity on null columns.

Every expectation is stated from the published semantics (shared/reference/papers.md §2.3-2.4,
written out independently in ``tests/helpers/unimoe_reference.py``), not from audiomoe's own code.
"""

from __future__ import annotations

import math

import pytest
import torch

import audiomoe
from audiomoe.core.interfaces import Routing
from audiomoe.moe.layer import MoELayer
from audiomoe.routers.functional import sparse_mixer_weights, top_k_select, top_p_count
from audiomoe.routers.selectors.top_k import TopK
from audiomoe.routers.selectors.top_p import TopP
from audiomoe.testing import ConformanceError, build_component, check_component

from helpers.unimoe_reference import sparse_mixer_row, unimoe_block

RENORM_TOP1 = '''
"""A top-1 router that renormalises its single pick: weight P/P = 1 (the bug the check must catch)."""
import torch
from audiomoe import Router
from audiomoe.routers.functional import make_routing


class RenormTop1(Router):
    """Linear gate, top-1, weight p/p."""

    def __init__(self, params, *, d_model, num_experts):
        super().__init__(params)
        self.gate = torch.nn.Linear(d_model, num_experts, bias=False)

    def forward(self, inputs, item_mask=None, task_ids=None):
        probs = self.gate(inputs).softmax(-1)
        top = probs.max(-1, keepdim=True)
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top.indices, True)
        weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values)
        return make_routing(probs.log(), mask, weights, item_mask)


class SometimesNothing(Router):
    """Expert-choice-like: each column takes its 2 best items, so some items get no pick at all."""

    def __init__(self, params, *, d_model, num_experts):
        super().__init__(params)
        self.gate = torch.nn.Linear(d_model, num_experts, bias=False)

    def forward(self, inputs, item_mask=None, task_ids=None):
        logits = self.gate(inputs)
        probs = logits.softmax(-1)
        scores = probs if item_mask is None else probs.masked_fill(~item_mask[:, None], -1.0)
        top = scores.topk(min(2, inputs.shape[0]), dim=0).indices
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(0, top, True)
        return make_routing(logits, mask, probs * mask, item_mask)
'''

REGISTER = """
import audiomoe

@audiomoe.hookimpl
def audiomoe_register_components(register):
    register("router", "renorm_top1", "acme_routers.routers:RenormTop1", "p/p top-1")
    register("router", "sometimes_nothing", "acme_routers.routers:SometimesNothing", "expert choice")
"""


@pytest.fixture
def acme(install_dist):
    install_dist(
        "acme-routers",
        "0.1.0",
        {"acme": "acme_routers"},
        {"acme_routers.routers": RENORM_TOP1, "acme_routers.__init__": REGISTER},
    )
    audiomoe.reset_registry()


# -- the router must learn from the task -----------------------------------------------------------


def _task_grads(model, batch):
    out = model(batch, predict=False)
    task = sum(v for k, v in out.losses.items() if k.startswith("task/"))  # aux losses off
    params = {n: p for n, p in model.named_parameters() if ".router." in f".{n}" and p.requires_grad}
    grads = torch.autograd.grad(task, list(params.values()), allow_unused=True)
    return {n: 0.0 if g is None else float(g.abs().max()) for n, g in zip(params, grads)}


def test_mowe_router_gets_a_task_gradient_on_every_parameter():
    torch.manual_seed(0)
    model = audiomoe.compose("mowe-tiny")
    tasks = model.task_names
    batch = audiomoe.AudioBatch(
        torch.randn(4, 8000) * 0.1,
        16000,
        [tasks[i % len(tasks)] for i in range(4)],
        targets=[model.heads[tasks[i % len(tasks)]].example_targets(1)[0] for i in range(4)],
    )
    grads = _task_grads(model, batch)
    assert grads and all(g > 1e-6 for g in grads.values()), grads  # was exactly 0.0 with P/P weights


def test_top1_override_of_a_backbone_router_gets_a_task_gradient():
    torch.manual_seed(0)
    model = audiomoe.compose("tiny-moe-cls", ["backbone.moe.router.k=1"])
    batch = audiomoe.AudioBatch(torch.randn(4, 6000) * 0.1, 16000, ["emotion", "speaker"] * 2, targets=[1, 2, 3, 4])
    grads = _task_grads(model, batch)
    assert grads and all(g > 1e-6 for g in grads.values()), grads


@pytest.mark.parametrize("top1", ["raw", "straight_through"])
def test_top1_weights_value_and_gradient(top1):
    logits = torch.tensor([[2.0, 0.5, -1.0]], requires_grad=True)
    mask, weights, probs = top_k_select(logits, 1, True, top1)
    assert mask.tolist() == [[True, False, False]]
    expected = probs[0, 0].item() if top1 == "raw" else 1.0
    assert weights[0, 0].item() == pytest.approx(expected)
    (g,) = torch.autograd.grad(weights[0, 0], logits)
    p = probs.detach()[0]
    torch.testing.assert_close(g[0], p[0] * (torch.eye(3)[0] - p))  # dP_0 / dlogits, both paths


def test_conformance_rejects_a_router_with_no_task_gradient(acme):
    with pytest.raises(ConformanceError, match=r"get no gradient .* from a loss on the combine weights alone.*p/p = 1"):
        check_component("router", "renorm_top1")


def test_describe_says_which_top1_weighting_is_used():
    from audiomoe.core.describe import describe

    params = {p["name"]: p for p in describe("selector", "top_k")["params"]}
    assert params["top1"]["default"] == "raw" and "straight-through" in params["top1"]["description"]
    router = {p["name"]: p for p in describe("router", "mowe")["params"]}
    assert "'top1': 'raw'" in str(router["selector"]["default"])


# -- UniMoE-exact at the edges ---------------------------------------------------------------------


def test_near_tie_ranks_by_logit_not_by_probability():
    # logits 1e-8 apart round to one float32 probability; the released code's torch.max takes the larger logit
    logits = torch.tensor([[0.0, 1e-8, -3.0, -3.0]])
    probs = logits.softmax(-1)
    assert probs[0, 0] == probs[0, 1]
    assert TopK(TopK.Params(k=1), num_experts=4)(logits).mask[0].tolist() == [False, True, False, False]
    sel = TopP(TopP.Params(p=0.3), num_experts=4)(logits)
    assert sel.mask[0].tolist() == [False, True, False, False]
    k, order = top_p_count(probs, 0.3, logits=logits)
    assert int(k) == 1 and int(order[0, 0]) == 1


def test_sparse_mixer_has_no_denominator_clamp():
    # relative gap (1e-14 - 5e-15) / 1e-14 = 0.5 > 2 eps: no near tie, each multiplier is 1 (papers.md §2.3)
    logits = torch.tensor([[1e-14, 5e-15, -5.0, -5.0]], dtype=torch.float64)
    k, order = top_p_count(logits.softmax(-1), 0.7, logits=logits)
    assert int(k) == 2
    w = sparse_mixer_weights(logits, order, k, 0.01)
    ref = sparse_mixer_row(logits[0], 2, 0.01)
    torch.testing.assert_close(w[0], ref / (ref.sum() + 1e-6))
    assert w[0, :2].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)  # a 1e-12 clamp gave [1/3, 2/3]


def test_fp32_gate_in_training_only():
    scorer = build_component("scorer", "linear", {"fp32": "train"}, {"d_model": 8, "num_experts": 4})
    x = torch.randn(5, 8).bfloat16()
    assert scorer.train()(x).dtype == torch.float32
    assert scorer.eval()(x).dtype == torch.bfloat16


def moe(d_model: int, **params) -> MoELayer:
    """An MoE layer built through the registry, as a backbone builds it."""
    return audiomoe.component_builder("moe", {"name": "moe", "params": params})(d_model=d_model)


def _unimoe_layer(d: int = 16, fp32="train") -> MoELayer:
    router = {
        "name": "top_p",
        "params": {
            "input_jitter": 0.01,
            "unimoe_aux_weight": 1.0,
            "unimoe_aux_weight_end": None,
            "scorer": {"name": "linear", "params": {"fp32": fp32}},
            "selector": {"name": "top_p", "params": {"p": 0.7, "weights": "unimoe_code", "mixer_eps": 0.01}},
        },
    }
    torch.manual_seed(0)
    return moe(
        d,
        router=router,
        expert={"name": "swiglu", "params": {"d_ff": 8}},
        num_experts=8,
        num_null=1,
        num_shared=2,
        shared_mode="gated",
        shared_d_ff=4,
    )


@pytest.mark.parametrize("training", [True, False])
def test_moe_layer_equals_the_published_unimoe_block(training):
    """Jitter reaches the shared columns (one gate), fp32 gate in training, k, weights, output, aux, gradients."""
    layer = _unimoe_layer().train(training)
    x = torch.randn(40, 16)
    gate = torch.cat([layer.router.scorer.layers[0].weight, layer.shared_gate.weight])
    torch.manual_seed(7)
    y, routing = layer(x)
    torch.manual_seed(7)  # the same jitter draw
    experts = [lambda t, e=e: layer.experts.expert_forward(e, t) for e in range(8)]
    shared = [lambda t, s=s: layer.shared.expert_forward(s, t) for s in range(2)]
    ref = unimoe_block(x, gate, experts, shared, num_null=1, training=training)
    torch.testing.assert_close(routing.mask, ref["mask"])
    torch.testing.assert_close(routing.applied, ref["weights"][:, :9], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routing.shared_weights, ref["weights"][:, 9:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y, ref["y"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routing.aux_losses["unimoe_aux"], ref["aux"])
    ga = torch.autograd.grad((y * x).sum(), [layer.router.scorer.layers[0].weight, layer.shared_gate.weight])
    gb = torch.autograd.grad((ref["y"] * x).sum(), [layer.router.scorer.layers[0].weight, layer.shared_gate.weight])
    for a, b in zip(ga, gb):
        assert b.abs().max() > 1e-4
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def _null_routing(n: int = 8) -> Routing:
    """Every token picks expert 0 and the null column 1 (of 2 columns: 1 routed + 1 null)."""
    logits = torch.linspace(-1, 1, n)[:, None].repeat(1, 2) * torch.tensor([1.0, -1.0])
    mask = torch.ones(n, 2, dtype=torch.bool)
    weights = logits.softmax(-1)
    return Routing(logits, mask, weights, torch.zeros(n, 1, dtype=torch.long), mask.sum(0))


@pytest.mark.parametrize("null_capacity", [False, True])
def test_null_capacity_limits_null_picks_by_logit(null_capacity):
    torch.manual_seed(0)
    layer = moe(
        4,
        num_experts=1,
        num_null=1,
        router={"name": "top_k", "params": {"k": 1}},
        capacity_factor=1.0,
        capacity_basis="tokens",
        drop_policy="probs",
        renormalize_drops=True,
        null_capacity=null_capacity,
    )
    r = _null_routing()
    layer.combine(torch.randn(8, 4), r)
    # C = ceil(1.0 * 8 tokens / 2 columns) = 4 per column; the routed column keeps its 4 largest logits
    routed_dropped = r.logits[:, 0].argsort()[:4]
    null_dropped = r.logits[:, 1].argsort()[:4]
    expected = torch.zeros(8, dtype=torch.long)
    expected[routed_dropped] += 1
    if null_capacity:
        expected[null_dropped] += 1
    assert r.dropped.tolist() == expected.tolist()
    kept = r.applied > 0
    assert kept[:, 1].sum() == (4 if null_capacity else 8)
    # renormalised: each token's kept weights add up to its selected mass (1 here) unless it lost everything
    survivors = kept.any(-1)
    torch.testing.assert_close(r.applied[survivors].sum(-1), torch.ones(int(survivors.sum())))


def test_a_router_may_leave_items_without_a_pick(acme):
    report = check_component("router", "sometimes_nothing")
    assert any("task-loss gradients" in c for c in report.checks)
    layer = moe(8, num_experts=3, num_shared=1, shared_mode="unit", router="sometimes_nothing")
    x = torch.randn(10, 8)
    y, r = layer(x)
    lonely = ~r.mask.any(-1)
    assert lonely.any()
    torch.testing.assert_close(y[lonely], layer.shared.expert_forward(0, x[lonely]))  # shared-only output, no error


def test_capacity_is_exact_where_float_arithmetic_rounds_up():
    """cf 1.1, 90 tokens, 9 columns: exactly 11 per column (float64 gives 11.000000000000002 -> 12)."""
    from audiomoe.moe.functional import capacity_of

    assert math.ceil(1.1 * 90 / 9) == 12  # the case is real: the naive formula is one too many
    assert capacity_of(90, 9, 1.1, 0) == 11
    # against integer arithmetic for factors written with one decimal (cf = a / 10)
    for a in range(5, 31):
        for t in (1, 7, 90, 128, 1000, 4096):
            for e in (1, 2, 3, 8, 9, 11):
                assert capacity_of(t, e, a / 10, 0) == -(-a * t // (10 * e)), (a, t, e)
    assert capacity_of(3, 9, 1.0, 4) == 4  # min_capacity still a floor


def test_a_layer_at_the_rounding_case_keeps_exactly_the_released_capacity():
    """Every one of 90 tokens picks column 0 of 9 (8 routed + 1 null): the layer keeps 11, drops 79."""
    layer = moe(
        8,
        num_experts=8,
        num_null=1,
        router={"name": "top_k", "params": {"k": 1}},
        capacity_factor=1.1,
        capacity_basis="tokens",
    )
    n = 90
    logits = torch.full((n, 9), -5.0)
    logits[:, 0] = 5.0
    mask = torch.zeros(n, 9, dtype=torch.bool)
    mask[:, 0] = True
    r = Routing(logits, mask, mask.float(), torch.zeros(n, 1, dtype=torch.long), mask.sum(0))
    layer.combine(torch.randn(n, 8), r)
    assert int((r.applied[:, 0] > 0).sum()) == 11 and int(r.dropped.sum()) == n - 11
