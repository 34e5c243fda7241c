"""Recipes: strict format with dotted-key problems, --set routing, built-in recipes, groups, schedules."""

from __future__ import annotations

import math
import os

import pytest

import audiomoe
from audiomoe.core.composer import validate
from audiomoe.core.errors import AudioMoEError, ConfigError, MissingPretrainedError
from audiomoe.train.groups import named_groups, resolve_group
from audiomoe.train.optim import lr_factor
from audiomoe.train.recipe import ScheduleSpec, list_recipes, load_recipe, recipe_for_preset

BASE = {"model": {"preset": "tiny-cls"}, "data": "tones", "stages": [{"name": "a", "steps": 3}]}


def test_every_problem_is_reported_at_once_under_its_dotted_key():
    bad = {
        "model": {"preset": "tiny-cls", "spec": {}},
        "optim": {"lr": -1, "betaz": [0.9, 0.99]},
        "schedule": {"kind": "exp"},
        "stages": [
            {"name": "a", "steps": 0, "init": {}},
            {"name": "a", "steps": 2, "data": {"balanced": 4, "weights": {"x": 1}}},
        ],
    }
    with pytest.raises(ConfigError) as exc:
        load_recipe(bad)
    keys = {p.key for p in exc.value.problems}
    assert {
        "model",
        "optim.lr",
        "optim.betaz",
        "schedule.kind",
        "stages.0.steps",
        "stages.0.init",
        "stages.1.data",
    } <= keys, keys
    assert "give exactly one of 'preset' and 'spec'" in str(exc.value)


def test_stage_references_and_stage_optim_overrides_are_checked():
    raw = {**BASE, "stages": [{"name": "a", "steps": 2, "init": {"from_specialists": ["stage:nope"]}}]}
    with pytest.raises(ConfigError, match="'stage:nope' names no earlier specialists stage"):
        load_recipe(raw)
    raw = {**BASE, "stages": [{"name": "a", "steps": 2, "optim": {"lr": 0}}]}
    with pytest.raises(ConfigError, match=r"stages\.0\.optim.*lr"):
        load_recipe(raw)
    ok = load_recipe(
        {**BASE, "optim": {"lr": 0.01, "grad_clip": 2.0}, "stages": [{"name": "a", "steps": 2, "optim": {"lr": 0.5}}]}
    )
    assert ok.stage_optim(ok.stages[0]).lr == 0.5 and ok.stage_optim(ok.stages[0]).grad_clip == 2.0


def test_set_changes_recipe_sections_and_sends_other_keys_to_the_model():
    r = load_recipe(
        "unimoe-curriculum-tiny",
        ["optim.lr=0.01", "stages.warmup.steps=7", "stages.3.train=[router]", "backbone.moe.router.p=0.6"],
    )
    assert r.optim.lr == 0.01 and r.stages[2].steps == 7 and r.stages[3].train == ["router"]
    assert r.model.overrides[-1] == "backbone.moe.router.p=0.6"
    with pytest.raises(ConfigError, match="no stage 'nope'"):
        load_recipe("unimoe-curriculum-tiny", ["stages.nope.steps=3"])


def test_unknown_recipe_names_the_built_in_ones():
    with pytest.raises(AudioMoEError, match="Did you mean 'unimoe-naive-tiny'.*Built-in recipes: mowe"):
        load_recipe("unimoe-naiv-tiny")


@pytest.mark.parametrize("name", list_recipes())
def test_built_in_recipes_load_and_the_tiny_ones_compose(name):
    r = load_recipe(name)
    assert r.name == name and r.summary and r.total_steps() > 0
    if name.endswith("-tiny") or name.startswith("unimoe"):
        try:
            validate(r.model.source(), r.model.overrides)  # the model composes (on the meta device)
        except (
            MissingPretrainedError
        ) as exc:  # a full-size recipe on local weights: composes up to the checkpoints it names
            assert not name.endswith("-tiny") and "Qwen/Qwen2.5-3B" in str(exc)


def test_the_built_in_set_is_the_issues_list():
    names = set(list_recipes())
    for base in ("unimoe-curriculum", "unimoe-naive", "mowe", "mowe-base-only", "unimoe-audio-curriculum"):
        assert {base, base + "-tiny"} <= names


def test_a_preset_is_a_one_stage_recipe_training_everything():
    r = recipe_for_preset("tiny-cls", ["seed=3"], steps=12, optim={"lr": 0.01})
    assert [(s.name, s.steps, s.train) for s in r.stages] == [("train", 12, ["all"])]
    assert r.model.preset == "tiny-cls" and r.model.overrides == ["seed=3"] and r.optim.lr == 0.01
    # --set of a recipe section sets the one-stage recipe (after the flags), not the model, as for a recipe
    r = recipe_for_preset(
        "tiny-cls", ["compile=true", "optim.lr=0.02", "d_model=32", "data=tones"], steps=4, optim={"lr": 0.01}
    )
    assert r.compile is True and r.optim.lr == 0.02 and r.data == "tones" and r.model.overrides == ["d_model=32"]
    with pytest.raises(ConfigError, match=r"stages\.nope.*no stage 'nope'"):
        recipe_for_preset("tiny-cls", ["stages.nope.steps=3"], steps=4)
    # a manifest path is recorded absolute: eval, report and resume find it from another directory
    assert recipe_for_preset("tiny-cls", ["data=runs/my.jsonl"], steps=1).data == os.path.abspath("runs/my.jsonl")


def test_named_groups_are_found_by_module_type_and_name():
    moe = audiomoe.compose("tiny-unimoe")
    g = named_groups(moe)
    assert {n.split(".moe.")[1].split(".")[0] for n in g["router"]} == {"router", "shared_gate"}
    assert g["experts"] == {n for n, _ in moe.named_parameters() if ".moe.experts." in n}
    assert all(".moe.shared." in n for n in g["shared_experts"])
    assert g["heads.emotion"] == {"heads.emotion.head.weight", "heads.emotion.head.bias"}
    mowe = audiomoe.compose("mowe-tiny")
    g = named_groups(mowe)
    assert all(n.startswith("encoder.base.") for n in g["encoder.base"]) and all(
        n.startswith("encoder.weak.") for n in g["encoder.weak"]
    )
    assert {n for n in g["router"]} <= g["fusion"] and any(n.startswith("encoder.proj.") for n in g["fusion"])
    assert resolve_group(mowe, "encoder.weak.*.model", "t") == {n for n in g["encoder.weak"] if ".model." in n}


def test_a_group_matching_nothing_lists_the_groups_the_model_has():
    with pytest.raises(AudioMoEError) as exc:
        resolve_group(audiomoe.compose("tiny-cls"), "experts", "stages.0.train.0")
    msg = str(exc.value)
    assert (
        msg.startswith("stages.0.train.0: 'experts' matches no parameter")
        and "Groups this model has: all, encoder" in msg
    )
    assert "it has no encoder.base, encoder.weak, fusion, router, experts" in msg


def test_lr_schedule_warmup_then_decay():
    cos = ScheduleSpec(kind="cosine", warmup=10, min_lr_ratio=0.1)
    assert lr_factor(5, 110, cos) == 0.5 and lr_factor(10, 110, cos) == 1.0
    assert math.isclose(lr_factor(60, 110, cos), 0.55) and math.isclose(lr_factor(110, 110, cos), 0.1)
    lin = ScheduleSpec(kind="linear", warmup=0, min_lr_ratio=0.0)
    assert lr_factor(50, 100, lin) == 0.5 and lr_factor(100, 100, ScheduleSpec(kind="constant")) == 1.0


def test_a_misspelled_recipe_key_suggests_the_right_one_and_lists_the_section(capsys):
    from audiomoe.cli import main

    assert main(["train", "tiny-cls", "--set", "optim.lrr=1", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr = 1: unknown key 'lrr'. Did you mean 'lr'? Keys here: name, lr, betas" in err
    assert main(["train", "tiny-cls", "--set", "stages.train.stepz=1", "--steps", "1"]) == 2
    assert "unknown key 'stepz'. Did you mean 'steps'?" in capsys.readouterr().err


def test_a_warmup_as_long_as_the_stage_is_warned_about(tmp_path):
    from audiomoe.train import TrainConfig, train

    out = train("tiny-cls", config=TrainConfig(steps=3, warmup=5, eval_batches=0, progress=False))
    (w,) = [w["warning"] for w in out["warnings"]]
    assert "warms the lr up over 5 steps but has 3" in w and "lower schedule.warmup" in w
    assert train("tiny-cls", config=TrainConfig(steps=3, warmup=2, eval_batches=0, progress=False))["warnings"] == []
