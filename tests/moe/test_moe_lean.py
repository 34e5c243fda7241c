"""The lean routed path of a no-grad few-token call (a decoding step): no aux losses, no sort, only picked experts.

Issue 28: a cached decoding step ran ~100 small ops per MoE layer. Without autograd the router skips its aux
losses and sorted ids (computed when read), and on CPU the layer runs only the picked experts through views of the
stacked weights (``picked``), as transformers' MoE blocks do; training calls are unchanged.
"""

from __future__ import annotations

import pytest
import torch
from test_moe_layer import hand_routing, reference

from audiomoe import component_builder
from audiomoe.moe.dispatcher import GATHER_LIMIT, PICKED_TOKENS
from audiomoe.routers.functional import picked_indices

D, F, E = 64, 2048, 5  # one token over every expert is more than GATHER_LIMIT multiply-adds: dense does not take it


def big_layer(**kw):
    torch.manual_seed(0)
    spec = {"num_experts": E, "num_null": 2, "expert": {"name": "swiglu", "params": {"d_ff": F}}, **kw}
    return component_builder("moe", {"name": "moe", "params": spec})(d_model=D).double()


def test_auto_takes_picked_for_a_few_no_grad_tokens_on_cpu_and_equals_the_reference():
    assert E * 3 * D * F > GATHER_LIMIT
    layer = big_layer()
    plan = lambda n: layer.dispatcher.plan_for(layer.experts, torch.zeros(n, D, dtype=torch.float64))
    assert plan(1) == "fused"  # autograd on: training calls never take a decoding plan
    with torch.no_grad():
        assert plan(1) == plan(PICKED_TOKENS) == "picked" and plan(PICKED_TOKENS + 1) != "picked"
        for kind, n, kw in (
            ("topk", 1, {}),
            ("topk", 7, {}),
            ("topp", 7, {}),
            ("topp", 7, {"num_shared": 2, "shared_d_ff": 16}),
        ):
            if True:
                layer = big_layer(**kw)
                item_mask = torch.ones(n, dtype=torch.bool)
                if n > 1:
                    item_mask[2] = False  # a padded token is neither computed nor counted
                r = hand_routing(n, kind, item_mask=item_mask if n > 1 else None)
                tokens = torch.randn(n, D, dtype=torch.float64)
                out = layer.combine(tokens, r)
                assert layer.last_plan == "picked"
                torch.testing.assert_close(out, reference(layer, tokens, r), rtol=1e-10, atol=1e-10)
                assert layer.last_stats._stats is None, "a decoding step does not wait on its statistics"
                valid = r.mask[:, :E] & (r.item_mask[:, None] if r.item_mask is not None else True)
                assert layer.last_stats["expert_loads"] == valid.sum(0).tolist()
                assert layer.last_stats["tokens"] == (n if r.item_mask is None else int(r.item_mask.sum()))


@pytest.mark.parametrize("router", ["top_k", "top_p"])
def test_no_grad_skips_aux_losses_and_sorted_ids_until_read_training_keeps_them(router):
    layer = big_layer(router={"name": router, "params": {"balance_weight": 0.01, "z_loss_weight": 0.001}})
    x = torch.randn(2, 3, D, dtype=torch.float64)
    y_train, r_train = layer(x)
    assert {"balance", "z_loss"} <= set(r_train.aux_losses)
    assert float(r_train.aux_losses["balance"].detach()) > 1e-4  # a real loss, not float noise
    with torch.no_grad():
        y_lean, r_lean = layer(x)
    assert r_lean.aux_losses == {}
    assert "_indices" not in r_lean.__dict__ or r_lean.__dict__["_indices"] is None  # not sorted until read
    assert torch.equal(r_lean.indices, picked_indices(r_lean.mask, r_lean.weights))
    assert torch.equal(r_lean.mask, r_train.mask)
    torch.testing.assert_close(y_lean, y_train.detach(), rtol=1e-10, atol=1e-10)


def test_picked_plan_trains_like_the_loop():
    """``picked`` configured explicitly is a full plan: outputs and gradients equal the reference loop's."""
    results = {}
    x = torch.randn(6, D, dtype=torch.float64)
    for plan in ("loop", "picked"):
        layer = big_layer(dispatch=plan, num_shared=1, shared_d_ff=16)
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        y.square().sum().backward()
        results[plan] = (
            y.detach(),
            xi.grad,
            layer.experts.gate_up_proj.grad,
            layer.router.scorer.layers[0].weight.grad,
        )
        assert layer.last_plan == plan
    for a, b in zip(results["loop"], results["picked"]):
        assert float(b.abs().max()) > 1e-6  # gradients of real size reach every part
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
