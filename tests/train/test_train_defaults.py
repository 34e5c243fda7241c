"""Defaults that train: warmup over 5% of a stage, cosine decay to a tenth of the peak, gradients clipped at 1.0.

The old defaults (a constant 3e-3, no warmup, no clipping) made the main job's loss rise over its first 30 steps.
The same defaults must reach every entry point: a recipe, a preset run from the command line (its recipe as
written to run.json) and the Python ``train()`` API (``TrainConfig``).
"""

from __future__ import annotations

import json
import math

import pytest

from audiomoe import cli
from audiomoe.train import TrainConfig
from audiomoe.train.optim import lr_factor
from audiomoe.train.recipe import Recipe, ScheduleSpec, recipe_for_preset


def test_the_default_schedule_warms_up_then_decays_by_cosine():
    s = ScheduleSpec()
    assert (s.kind, s.warmup, s.min_lr_ratio) == ("cosine", None, 0.1)
    assert s.warmup_steps(300) == 15 and s.warmup_steps(2) == 0 and ScheduleSpec(warmup=7).warmup_steps(300) == 7
    f = [lr_factor(i, 300, s) for i in range(1, 301)]
    assert f[0] == pytest.approx(1 / 15) and f[14] == pytest.approx(1.0)  # linear warmup to the peak at step 15
    assert f[299] == pytest.approx(0.1)  # cosine ends at a tenth of the peak
    mid = 15 + (300 - 15) // 2
    assert lr_factor(mid, 300, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - 15) / 285)))
    assert all(a >= b for a, b in zip(f[14:], f[15:]))  # never rises after the warmup
    assert lr_factor(1, 2, s) == pytest.approx(
        0.55
    )  # a 2-step run: no warmup (no warning about one), straight into the decay


def test_every_entry_point_gets_the_same_defaults(tmp_path):
    want = {"grad_clip": 1.0, "kind": "cosine", "warmup": None, "min_lr_ratio": 0.1}
    rec = recipe_for_preset("tiny-cls", steps=10)
    assert {
        "grad_clip": rec.optim.grad_clip,
        **rec.schedule.model_dump(include={"kind", "warmup", "min_lr_ratio"}),
    } == want
    cfg = TrainConfig()
    fields = cfg.recipe_fields()
    api = Recipe.model_validate({"model": {"preset": "tiny-cls"}, "stages": [{"name": "train", "steps": 10}], **fields})
    assert {
        "grad_clip": api.optim.grad_clip,
        **api.schedule.model_dump(include={"kind", "warmup", "min_lr_ratio"}),
    } == want
    assert (
        cli.main(
            [
                "train",
                "tiny-cls",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--eval-batches",
                "0",
                "--quiet",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    stored = json.loads((tmp_path / "r" / "run.json").read_text())["recipe"]
    assert (
        stored["optim"]["grad_clip"] == 1.0
        and stored["schedule"]["kind"] == "cosine"
        and stored["schedule"]["warmup"] is None
    )
    assert (
        cli.main(
            [
                "train",
                "tiny-cls",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--eval-batches",
                "0",
                "--quiet",
                "--schedule",
                "constant",
                "--warmup",
                "1",
                "--set",
                "optim.grad_clip=null",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    stored = json.loads((tmp_path / "c" / "run.json").read_text())["recipe"]
    assert (
        stored["optim"]["grad_clip"] is None
        and stored["schedule"]["kind"] == "constant"
        and stored["schedule"]["warmup"] == 1
    )
