"""Run logs: log.jsonl per step, TensorBoard events, routing statistics per layer, health warnings."""

from __future__ import annotations

import json

import pytest

from audiomoe.train.recipe import load_recipe
from audiomoe.train.trainer import RunOptions, run_recipe


def _run(tmp_path, overrides, health=None, steps=6):
    recipe = load_recipe(
        {
            "name": "logs",
            "model": {"preset": "tiny-moe-cls", "overrides": overrides},
            "data": "tones",
            "batch_size": 8,
            "eval": {"batches": 1, "every": 3},
            "log": {"every": 1, "routing_every": 2, "health": health or {}},
            "schedule": {"kind": "cosine", "warmup": 2},
            "optim": {"grad_clip": 0.5},
            "stages": [{"name": "s", "steps": steps}],
        }
    )
    out = tmp_path / "run"
    return out, run_recipe(recipe, RunOptions(out_dir=str(out), progress=False, device="cpu"))


def _records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_json_line_per_step_with_loss_terms_lr_grad_norm_and_time_split(tmp_path):
    out, summary = _run(tmp_path, [])
    steps = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    r = steps[0]
    assert {"task/emotion", "task/speaker"} <= set(r["losses"]) and any(
        k.startswith("aux/backbone/layer0/") for k in r["losses"]
    )
    assert r["lr"] == pytest.approx(3e-3 / 2)  # warmup step 1 of 2
    assert r["grad_norm"] > 0 and r["items"] == 8
    assert (
        set(r["time"]) == {"data", "forward", "backward", "optimizer", "step"}
        and r["time"]["step"] >= r["time"]["forward"]
    )
    evals = [r for r in _records(out) if "eval" in r]
    assert [e["step"] for e in evals] == [3, 6] and "emotion/accuracy" in evals[0]["eval"]
    assert summary["final_loss"] == steps[-1]["loss"]


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = _run(tmp_path, [])
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "time/forward", "eval/emotion/accuracy"} <= tags
    assert "routing/backbone/layer0/load_max_over_mean" in tags
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    logged = [(r["step"], r["loss"]) for r in _records(out) if "loss" in r]
    assert [s for s, _ in loss] == [s for s, _ in logged] and all(
        abs(a - b) < 1e-5 for (_, a), (_, b) in zip(loss, logged)
    )


def test_routing_statistics_per_layer(tmp_path):
    out, _ = _run(tmp_path, ["backbone.moe.router=top_p", "backbone.moe.num_null=1"])
    reports = [r for r in _records(out) if "routing" in r]
    assert [r["step"] for r in reports] == [2, 4, 6]
    layer = reports[0]["routing"]["backbone/layer0"]
    assert {"load_max_over_mean", "experts_per_token", "null_share", "top_prob", "load", "per_task"} <= set(layer)
    assert len(layer["load"]) == 5 and abs(sum(layer["load"]) - 1) < 1e-3  # 4 experts + 1 null column
    assert 1.0 <= layer["experts_per_token"] <= 5.0 and 0.0 <= layer["null_share"] <= 1.0
    assert set(layer["per_task"]) <= {"emotion", "speaker"} and all(
        abs(sum(v) - 1) < 1e-3 for v in layer["per_task"].values()
    )


def test_health_warnings_for_unused_overloaded_and_uniform_routers(tmp_path):
    # the oracle router sends each task to one fixed expert: 2 of 4 experts never get a token
    out, summary = _run(tmp_path, ["backbone.moe.router=oracle"], {"unused_steps": 3, "max_load_share": 0.45})
    warns = [w["warning"] for w in summary["warnings"]]
    assert any("expert" in w and "got no token for" in w for w in warns), warns
    assert any("of the load (over 45%)" in w for w in warns), warns
    logged = [r["warning"] for r in _records(out) if "warning" in r]
    assert logged == warns and len(set(warns)) == len(warns)  # each warned once
    out2, summary2 = _run(tmp_path / "u", ["backbone.moe.router=uniform"], {"uniform_checks": 2})
    assert any("router stuck at uniform" in w["warning"] for w in summary2["warnings"])
    _, healthy = _run(tmp_path / "h", [])
    assert not [w for w in healthy["warnings"] if "uniform" in w["warning"]]
