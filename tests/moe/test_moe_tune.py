"""Plan tuning outside ``forward``: ``tune_plans`` and ``audiomoe bench moe --tune`` on a real composed model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import audiomoe
from audiomoe.core.errors import AudioMoEError
from audiomoe.moe.dispatcher import PLANS
from audiomoe.moe.layer import MoELayer
from audiomoe.moe.tune import distinct_layers, tune_plans


def test_tune_times_every_runnable_plan_once_per_layer_shape_and_picks_the_fastest():
    model = audiomoe.compose("tiny-unimoe")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert (
        len(layers) == 2 and len(distinct_layers(model, torch.device("cpu"), torch.float32)) == 1
    )  # two layers, one shape
    table, rows = tune_plans(model, tokens=64, reps=1)
    (key,) = table
    assert key == "cpu:float32:d32:f32:e8"
    timed = {r.plan: r.seconds for r in rows if r.seconds is not None}
    assert set(timed) == {"loop", "fused", "grouped_mm", "gathered", "dense", "picked"}, rows  # xformers: CUDA only
    assert table[key] == min(timed, key=timed.__getitem__) and table[key] in PLANS
    assert all(r.max_diff < 1e-5 for r in rows if r.seconds is not None)
    assert next(r for r in rows if r.plan == "xformers").note == "xformers plan is CUDA only"
    assert [p.grad for p in model.parameters()] == [None] * len(list(model.parameters())), (
        "the model itself is not touched"
    )


def test_tune_refuses_a_model_without_moe_layers_and_skips_expert_kinds_without_a_grouped_form():
    with pytest.raises(AudioMoEError, match="no MoE layer"):
        tune_plans(audiomoe.compose("tiny-cls"), tokens=8, reps=1)
    table, rows = tune_plans(audiomoe.compose("tiny-moe-cls"), tokens=8, reps=1)
    assert table == {} and "nothing to tune" in rows[0].note


def test_bench_moe_cli_writes_a_plan_table_the_model_then_reads(tmp_path):
    out = tmp_path / "plans.json"
    cmd = [
        sys.executable,
        "-m",
        "audiomoe",
        "bench",
        "moe",
        "tiny-unimoe",
        "--tokens",
        "64",
        "--reps",
        "1",
        "--tune",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    table = json.loads(out.read_text())
    assert list(table) == ["cpu:float32:d32:f32:e8"] and "plan (* fastest)" in res.stdout
    assert f"--set backbone.moe.plan_table={out}" in res.stdout
    model = audiomoe.compose("tiny-unimoe", [f"backbone.moe.plan_table={out}"])
    layer = next(m for m in model.modules() if isinstance(m, MoELayer))
    assert layer.dispatcher.plan_for(layer.experts, torch.zeros(64, 32)) == table["cpu:float32:d32:f32:e8"]
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "no" / "dir.json")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
