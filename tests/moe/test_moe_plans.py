"""How the MoE dispatcher picks its plan: a fixed rule or a plan table, never a timing inside ``forward``."""

from __future__ import annotations

import pytest
import torch
from test_moe_layer import D, E, hand_routing, make_layer, reference

from audiomoe.core.errors import AudioMoEError


def test_plan_is_decided_without_timing_and_read_from_a_plan_table(tmp_path):
    """No plan is timed inside forward: auto is a fixed rule, or the plan table's entry for the shape."""
    import json

    from audiomoe.moe.dispatcher import plan_key

    layer = make_layer()
    assert layer.dispatcher.plan_for(layer.experts, torch.zeros(3, D)) == "fused"
    table = tmp_path / "plans.json"
    table.write_text(json.dumps({plan_key(torch.device("cpu"), torch.float64, layer.experts): "loop"}))
    tabled = make_layer(plan_table=str(table))
    tabled.combine(torch.randn(24, D, dtype=torch.float64), hand_routing(24, "topk"))
    assert tabled.last_plan == "loop"
    tabled.float().combine(torch.randn(24, D), hand_routing(24, "topk"))  # another dtype: not in the table
    assert tabled.last_plan == "fused"
    table.write_text(json.dumps({"cpu:float32:d16:f8:e5": "fastest"}))
    with pytest.raises(AudioMoEError, match="unknown plans.*fastest"):
        make_layer(plan_table=str(table))
    with pytest.raises(AudioMoEError, match="cannot read the MoE plan table"):
        make_layer(plan_table=str(tmp_path / "missing.json"))


def test_a_plan_table_decides_training_calls_but_not_decoding_steps(tmp_path):
    """A table is timed on fwd+bwd: it names the plan of tracked and large calls; a small no-grad step stays dense."""
    import json

    from audiomoe.moe.dispatcher import plan_key

    table = tmp_path / "plans.json"
    table.write_text(json.dumps({plan_key(torch.device("cpu"), torch.float64, make_layer().experts): "loop"}))
    layer = make_layer(plan_table=str(table))
    assert layer.dispatcher.plan_for(layer.experts, torch.zeros(3, D, dtype=torch.float64)) == "loop"
    with torch.no_grad():
        assert layer.dispatcher.plan_for(layer.experts, torch.zeros(3, D, dtype=torch.float64)) == "dense"
        assert (
            layer.dispatcher.plan_for(layer.experts, torch.zeros(50_000, D, dtype=torch.float64), pairs=100_000)
            == "loop"
        )


def test_auto_takes_dense_then_gathered_only_without_autograd_and_for_small_steps():
    """A decoding step (no grad, a few tokens) runs every expert densely; a few pairs of more tokens are gathered;
    training and large batches take the fused plan; every choice gives the reference output."""
    from audiomoe.moe.dispatcher import GATHER_LIMIT

    layer = make_layer()
    per_pair = 3 * D * 8
    few_tokens, few_pairs = GATHER_LIMIT // (E * per_pair), GATHER_LIMIT // per_pair
    plan = lambda n, pairs=None: layer.dispatcher.plan_for(layer.experts, torch.zeros(n, D), pairs=pairs)
    assert plan(few_tokens) == "fused" and plan(3, 1) == "fused"  # grad enabled: never dense nor gathered
    with torch.no_grad():
        assert plan(few_tokens) == "dense" and plan(few_tokens + 1) == "fused"
        assert plan(few_tokens + 1, few_pairs) == "gathered" and plan(few_tokens + 1, few_pairs + 1) == "fused"
        for kw, n in (
            (dict(), 6),
            (dict(num_shared=2, shared_d_ff=4), 6),
            (dict(capacity_factor=0.8), 6),
            (dict(), few_tokens + 40),
        ):
            layer = make_layer(**kw)
            r, tokens = hand_routing(n, "topp"), torch.randn(n, D, dtype=torch.float64)
            fast = layer.combine(tokens, r)
            assert layer.last_plan == ("dense" if n <= few_tokens else "gathered"), kw
            if (
                layer.last_plan == "dense" and "capacity_factor" not in kw
            ):  # a decoding step does not wait on its statistics
                assert layer.last_stats._stats is None
                assert dict(layer.last_stats) == {
                    "tokens": n,
                    "routed_pairs": int(r.mask[:, :E].sum()),
                    "dropped_pairs": 0,
                    "capacity": -1,
                    "routed_per_token": int(r.mask[:, :E].sum()) / n,
                    "expert_loads": r.mask[:, :E].sum(0).tolist(),
                }
            torch.testing.assert_close(fast, reference(layer, tokens, r), rtol=1e-10, atol=1e-10)
            if not kw.get("num_shared"):
                assert torch.all(fast[0] == 0), "a null-only token without shared experts is zero"
            assert layer.last_stats["routed_pairs"] == int(r.mask[:, :E].sum()) - layer.last_stats["dropped_pairs"]
            if "capacity_factor" not in kw:
                assert layer.last_stats["expert_loads"] == r.mask[:, :E].sum(0).tolist()
