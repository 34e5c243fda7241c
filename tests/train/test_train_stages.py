"""Stages: freezing leaves frozen tensors bit-identical, one optimizer per stage, a global step counter,
per-stage lr schedule and aux-weight schedule, resume across a stage boundary, gradient accumulation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import audiomoe
from audiomoe.train import load_trainer_state
from audiomoe.train.checkpoint import _decode
from audiomoe.train.groups import named_groups
from audiomoe.train.optim import lr_factor
from audiomoe.train.recipe import ScheduleSpec, load_recipe
from audiomoe.train.stages import apply_aux_weight, aux_routers
from audiomoe.train.trainer import RunOptions, run_recipe

JITTER = ["backbone.moe.router.input_jitter=0.01"]  # training draws from the RNG: a resume must restore it
RECIPE = {
    "name": "two-stage",
    "model": {"preset": "tiny-unimoe", "overrides": JITTER},
    "data": "tones",
    "batch_size": 8,
    "eval": {"batches": 0},
    "log": {"routing_every": 0},
    "checkpoint": {"every": 1, "keep": 0},
    "schedule": {
        "kind": "constant"
    },  # the default is cosine with warmup; the lr test below reads a constant first stage
    "stages": [
        {"name": "gates", "steps": 3, "train": ["router", "shared_experts"]},
        {
            "name": "rest",
            "steps": 4,
            "freeze": ["encoder", "backbone.blocks.0"],
            "optim": {"lr": 0.01},
            "schedule": {"kind": "linear"},
            "aux_weight": {"start": 0.5, "end": 0.1, "steps": 4},
        },
    ],
}


def _run(out, recipe=RECIPE, resume=False):
    return run_recipe(load_recipe(recipe), RunOptions(out_dir=str(out), resume=resume, progress=False, device="cpu"))


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages") / "run"
    return out, _run(out)


def _w(out, step):
    return load_file(str(out / f"step-{step:06d}" / "model.safetensors"))


def test_frozen_tensors_are_bit_identical_after_each_stage(two_stage):
    out, summary = two_stage
    init = audiomoe.compose("tiny-unimoe", JITTER).state_dict()
    groups = named_groups(audiomoe.compose("tiny-unimoe", JITTER))
    s1, s2 = _w(out, 3), _w(out, 7)
    trained1 = groups["router"] | groups["shared_experts"]
    params = set(groups["all"])
    for name in params:
        same1 = torch.equal(s1[name], init[name])
        assert same1 != (name in trained1), name  # stage 1: exactly the gates and shared experts moved
    frozen2 = groups["encoder"] | {n for n in params if n.startswith("backbone.blocks.0.")}
    for name in params:
        assert torch.equal(s2[name], s1[name]) == (name in frozen2), name  # stage 2: exactly the frozen ones stayed
    assert [s["trainable_tensors"] for s in summary["stages"]] == [len(trained1), len(params - frozen2)]


def test_one_optimizer_per_stage_over_its_trainable_tensors(two_stage):
    out, summary = two_stage
    for step, n in ((3, summary["stages"][0]["trainable_tensors"]), (7, summary["stages"][1]["trainable_tensors"])):
        ckpt = out / f"step-{step:06d}"
        meta = json.loads((ckpt / "trainer.json").read_text())
        opt = _decode(meta["optimizer"], load_file(str(ckpt / "trainer.safetensors")))
        assert sum(len(g["params"]) for g in opt["param_groups"]) == n == len(opt["state"])


def test_the_step_counter_runs_across_stages_with_each_stages_lr(two_stage):
    out, _ = two_stage
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["stage"], r["stage_step"]) for r in recs if "loss" in r]
    assert steps == [(1, "gates", 1), (2, "gates", 2), (3, "gates", 3)] + [(3 + k, "rest", k) for k in range(1, 5)]
    assert sorted(p.name for p in out.glob("step-*")) == [f"step-{s:06d}" for s in range(1, 8)]
    lrs = [r["lr"] for r in recs if "loss" in r]
    assert lrs[:3] == [3e-3] * 3  # the recipe's constant schedule
    assert lrs[3:] == pytest.approx([0.01 * lr_factor(k, 4, ScheduleSpec(kind="linear")) for k in range(1, 5)])
    state = load_trainer_state(out)
    assert state["step"] == 7 and state["extra"]["stage_name"] == "rest" and state["extra"]["stage_step"] == 4


def test_the_aux_weight_schedule_restarts_with_its_stage(two_stage):
    out, _ = two_stage
    positions = lambda step: {k: int(v) for k, v in _w(out, step).items() if k.endswith("router.step")}
    assert set(positions(3).values()) == {3} and set(positions(7).values()) == {
        4
    }  # reset to 0 at stage 2, then 4 steps
    model = audiomoe.compose("tiny-unimoe")
    assert apply_aux_weight(model, load_recipe(RECIPE).stages[1].aux_weight, 4, True, "stages.1") == 2
    r = aux_routers(model)[0]
    assert float(r.aux_weight()) == pytest.approx(0.5)
    for _ in range(4):
        model.advance_schedules()
    assert float(r.aux_weight()) == pytest.approx(0.1)
    with pytest.raises(
        audiomoe.AudioMoEError, match="stages.1.aux_weight: this model has no router with a UniMoE aux loss"
    ):
        apply_aux_weight(audiomoe.compose("tiny-cls"), load_recipe(RECIPE).stages[1].aux_weight, 4, True, "stages.1")


def test_resume_at_a_stage_boundary_ends_bit_identical(two_stage, tmp_path):
    out, _ = two_stage
    cut = tmp_path / "cut"
    shutil.copytree(out, cut, ignore=shutil.ignore_patterns(*[f"step-{s:06d}" for s in range(4, 8)], ".lock"))
    (cut / "latest").write_text("step-000003\n")
    resumed = _run(cut, resume=True)
    assert resumed["start_step"] == 3 and [s["name"] for s in resumed["stages"]] == ["rest"]
    a, b = _w(out, 7), _w(cut, 7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x)["step"] for x in (cut / "log.jsonl").read_text().splitlines()]
    assert logged == sorted(logged) and len(logged) == len(set(logged)) == 7  # no step logged twice


def test_a_stage_that_trains_nothing_is_refused(tmp_path):
    bad = {**RECIPE, "stages": [{"name": "x", "steps": 1, "train": ["router"], "freeze": ["router"]}]}
    with pytest.raises(audiomoe.AudioMoEError, match="stages.0: the stage trains no parameter"):
        _run(tmp_path / "x", bad)
    assert not (tmp_path / "x" / "run.json").exists()  # refused before the run started


def test_accumulation_of_two_half_batches_is_one_full_batch(tmp_path):
    base = {
        "model": {"preset": "tiny-cls"},
        "data": "tones",
        "eval": {"batches": 0},
        "stages": [{"name": "a", "steps": 4}],
    }
    full = _run(tmp_path / "full", {**base, "name": "full", "batch_size": 8})
    half = _run(tmp_path / "half", {**base, "name": "half", "batch_size": 4, "optim": {"accumulation": 2}})
    la = [json.loads(x)["loss"] for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "half" / "log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-6) and full["final_loss"] == pytest.approx(half["final_loss"], abs=1e-6)
    a, b = _w(tmp_path / "full", 4), _w(tmp_path / "half", 4)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
