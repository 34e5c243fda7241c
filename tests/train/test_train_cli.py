"""`audiomoe train RECIPE|PRESET`: built-in recipes by name, --set on recipes, resume of a recipe run, devices, bf16."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from audiomoe import cli
from audiomoe.train.recipe import list_recipes

ONE = {
    "name": "one",
    "model": {"preset": "tiny-cls"},
    "data": "tones",
    "batch_size": 4,
    "eval": {"batches": 0},
    "stages": [{"name": "only", "steps": 2}],
}


def _yaml(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_list_shows_every_built_in_recipe_with_its_summary(capsys):
    assert cli.main(["train", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list_recipes() and all(len(line.split()) > 3 for line in out)


def test_a_recipe_yaml_trains_and_resumes_from_its_run_directory(tmp_path, capsys):
    path = _yaml(tmp_path, ONE)
    out = tmp_path / "run"
    assert cli.main(["train", path, "--out", str(out), "--quiet", "--device", "cpu", "--set", "optim.lr=0.01"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["recipe"]["name"] == "one" and info["recipe"]["optim"]["lr"] == 0.01
    assert (
        cli.main(["train", "--resume", str(out), "--steps", "4", "--quiet"]) == 0
    )  # the recipe is read back from run.json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["start_step"] == 2 and summary["steps"] == 4 and summary["recipe"] == "one"
    assert (out / "latest").read_text().strip() == "step-000004"


def test_steps_on_a_multi_stage_recipe_asks_for_the_stage(capsys):
    assert cli.main(["train", "unimoe-curriculum-tiny", "--steps", "10", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        "--steps sets the steps of a one-stage run; this recipe has 4 stages (foundation, specialists, warmup, joint)"
        in err
    )
    assert "--set stages.NAME.steps=N" in err


def test_a_bad_recipe_names_each_problem_by_dotted_key(tmp_path, capsys):
    path = _yaml(tmp_path, {**ONE, "optim": {"lr": 0}, "stages": [{"name": "only", "steps": 2, "trian": ["router"]}]})
    assert cli.main(["train", path, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "stages.0.trian" in err and "Traceback" not in err


def test_cuda_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["train", "tiny-cls", "--steps", "1", "--device", "cuda", "--quiet"]) == 2
    assert "CUDA is not available here; use --device cpu" in capsys.readouterr().err


def test_bf16_autocast_trains_on_cpu_with_fp32_weights(tmp_path):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "tiny-moe-cls",
                "--data",
                "tones",
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--eval-batches",
                "0",
                "--precision",
                "bf16",
                "--out",
                str(out),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    from safetensors.torch import load_file

    weights = load_file(str(out / "step-000003" / "model.safetensors"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
    losses = [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and all(x == x for x in losses)


@pytest.mark.slow
def test_compile_trains_the_same_steps_as_eager(tmp_path):
    """``--compile`` (torch.compile, inductor on CPU: needs a C compiler) gives the eager run's losses."""
    losses = {}
    for mode in ("eager", "compiled"):
        out = tmp_path / mode
        argv = ["train", "tiny-cls", "--steps", "3", "--out", str(out), "--quiet"] + (
            ["--compile"] if mode == "compiled" else []
        )
        assert cli.main(argv) == 0
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in rows if "loss" in r]  # eval rows carry metrics only
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-5)
