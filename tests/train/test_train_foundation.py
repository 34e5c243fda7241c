"""A curriculum that keeps what the specialists learned: a shared dense foundation, specialists fine-tuned from
it, the naive baseline upcycled from the same foundation, and domain imbalance as one recipe knob."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import audiomoe
from audiomoe.core.composer import build_model
from audiomoe.train import load_checkpoint
from audiomoe.train.data import build_data
from audiomoe.train.recipe import InitSpec, load_recipe
from audiomoe.train.stages import apply_init, foundation_recipe
from audiomoe.train.trainer import RunOptions, run_recipe

QUIET = {"progress": False, "device": "cpu"}
MEMBERS = {
    "members": [{"name": "emo", "data": {"tasks": ["emotion"]}}, {"name": "spk", "data": {"tasks": ["speaker"]}}]
}


def _mini(stages, eval_batches: int = 1, seed: int = 0):
    return load_recipe(
        {
            "name": "mini",
            "model": {"preset": "tiny-unimoe", "overrides": [f"seed={seed}"]},
            "data": "tones",
            "batch_size": 8,
            "eval": {"batches": eval_batches, "every": 50, "final": False},
            "log": {"tensorboard": False},
            "schedule": {"kind": "constant", "warmup": 0},
            "stages": stages,
        }
    )


def test_specialists_with_init_start_from_the_foundation_weights(tmp_path):
    recipe = _mini(
        [
            {"name": "foundation", "steps": 3, "foundation": {}},
            # the members train only their own heads: every other tensor must be the foundation's, bit for bit
            {
                "name": "specialists",
                "steps": 2,
                "init": {"from_checkpoint": "stage:foundation"},
                "train": ["heads"],
                "specialists": MEMBERS,
            },
        ],
        eval_batches=0,
    )
    run_recipe(recipe, RunOptions(out_dir=str(tmp_path / "run"), **QUIET))
    found = load_file(str(tmp_path / "run/foundation/foundation/step-000003/model.safetensors"))
    dense = foundation_recipe(recipe, 0, audiomoe.compose("tiny-unimoe").spec).model.overrides
    fresh = audiomoe.compose("tiny-unimoe", dense)
    for member, task in (("emo", "emotion"), ("spk", "speaker")):
        sp = load_checkpoint(tmp_path / "run/specialists" / member).state_dict()
        assert set(sp) == set(found)
        for name, t in sp.items():
            if not t.is_floating_point():  # schedule positions count on
                continue
            if name.startswith(f"heads.{task}."):
                assert not torch.equal(t, found[name]), f"{member}: its own head {name} did not train"
            else:
                assert torch.equal(t, found[name]), f"{member}: {name} is not the foundation's"
        w = "backbone.blocks.0.attn.qkv.weight"
        assert (sp[w] - fresh.state_dict()[w]).abs().max() > 1e-3  # and the foundation is not a fresh init
    # the dense model's one-column gates cannot learn (softmax over one column is 1): frozen, so no run warns
    for log in [tmp_path / "run/foundation/foundation/log.jsonl", *(tmp_path / "run/specialists").glob("*/log.jsonl")]:
        assert "got no gradient" not in log.read_text(), log
    gate = "backbone.blocks.0.moe.router.scorer.layers.0.weight"
    assert gate in found and torch.equal(found[gate], fresh.state_dict()[gate])


@pytest.mark.slow
def test_naive_and_curriculum_foundations_are_bit_identical_at_one_seed(tmp_path):
    sets = ["stages.foundation.steps=3", "eval.batches=1", "eval.final=false", "log.tensorboard=false"]
    weights = []
    for name in ("unimoe-curriculum-tiny", "unimoe-naive-tiny"):
        recipe = load_recipe(name, sets + ["seed=3"]).model_copy(update={"seed": 7})
        idx = [i for i, s in enumerate(recipe.stages) if s.foundation is not None]
        assert idx == [0]
        sub = foundation_recipe(recipe, 0, recipe.model.resolve().to_dict())
        run_recipe(sub, RunOptions(out_dir=str(tmp_path / name), **QUIET))
        weights.append(load_file(str(tmp_path / name / "step-000003" / "model.safetensors")))
    a, b = weights
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["backbone.blocks.0.moe.experts.gate_up_proj"].shape[:2] == (1, 2 * 128)  # 8 x 32 over the 2 domains


def _event_share(recipe, batches: int = 60) -> tuple[float, int]:
    m = build_model(recipe.model.resolve())
    joint = next(s for s in recipe.stages if s.name == "joint")
    stream, _ = build_data(m, recipe.data, joint.data, batch_size=recipe.batch_size, seed=recipe.seed, eval_batches=0)
    loader = stream.loader
    tasks = Counter()
    for b in loader.sampler.epoch_batches(0)[:batches]:  # the sampler's draws, in training order (no audio decoded)
        tasks.update(loader.dataset.items[i].task for i, _ in b)
    n = sum(tasks.values())
    return tasks["event"] / n, n


@pytest.mark.parametrize("speech,sound", [(8, 1), (1, 1)])
def test_the_domain_knob_sets_the_sampled_proportions(speech, sound):
    sets = [f"domains.speech.proportion={speech}", f"domains.sound.proportion={sound}"]
    recipe = load_recipe("unimoe-naive-tiny", sets)
    joint = next(s for s in recipe.stages if s.name == "joint")
    each = speech / 3  # a domain's proportion is split evenly over its tasks
    assert joint.data.weights == pytest.approx({"language": each, "speaker": each, "style": each, "event": sound})
    share, n = _event_share(recipe)
    p = sound / (speech + sound)
    assert n >= 500
    assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), (share, p, n)  # binomial bound, 4 sd


def _merged_error(root, task: str, batches, seed: int = 0) -> float:
    """Relative error of the MoE merged from ``root``'s specialists on ``task`` against the specialist trained on it."""
    members = [root / "specialists" / m for m in ("emo", "spk")]
    model = audiomoe.compose("tiny-unimoe", [f"seed={seed}"]).eval()
    init = InitSpec(from_specialists=[str(p) for p in members])
    apply_init(model, init, _mini([{"name": "x", "steps": 1}]), None, "test")
    owner = load_checkpoint(members[0]).eval()
    with torch.no_grad():
        want = torch.cat([owner(b).outputs[task] for b in batches])
        got = torch.cat([model(b).outputs[task] for b in batches])
    return float((got - want).norm() / want.norm())


@pytest.mark.slow
def test_a_merge_of_specialists_from_one_foundation_keeps_their_predictions(tmp_path):
    """Over 5 seeds (one seed is noise: the merged model's gates are fresh, and at seed 1 both errors are ~0.65):
    specialists fine-tuned from one foundation merge with less error than specialists trained apart."""
    shared_stages = [
        {"name": "foundation", "steps": 30, "foundation": {}},
        {"name": "specialists", "steps": 10, "init": {"from_checkpoint": "stage:foundation"}, "specialists": MEMBERS},
    ]
    errs = []
    for seed in range(5):
        run_recipe(_mini(shared_stages, seed=seed), RunOptions(out_dir=str(tmp_path / f"shared{seed}"), **QUIET))
        apart = _mini([{"name": "specialists", "steps": 40, "specialists": MEMBERS}], seed=seed)
        run_recipe(apart, RunOptions(out_dir=str(tmp_path / f"apart{seed}"), **QUIET))
        model = audiomoe.compose("tiny-unimoe", [f"seed={seed}"])
        _, batches = build_data(model, "tones", None, batch_size=16, seed=5, eval_batches=4)  # held-out tones
        errs.append(
            tuple(_merged_error(tmp_path / f"{k}{seed}", "emotion", batches, seed) for k in ("shared", "apart"))
        )
    shared, apart = (sum(e[i] for e in errs) / len(errs) for i in (0, 1))
    # measured here: 0.56 against 0.72 (ratio 0.79), shared lower at 4 of 5 seeds; the rest of the error is the routed
    # FFN under fresh gates (what warm-up trains)
    assert shared < 0.85 * apart and sum(a < b for a, b in errs) >= 4, errs


def test_a_foundation_killed_after_its_last_checkpoint_before_its_score_resumes(tmp_path):
    """Killed between the foundation's last checkpoint and its final score: resuming the recipe must go on from the
    trained foundation (resuming the foundation itself finds no step left and would refuse)."""
    recipe = _mini(
        [
            {"name": "foundation", "steps": 3, "foundation": {}},
            {"name": "joint", "steps": 2, "init": {"upcycle": "stage:foundation"}},
        ],
        eval_batches=0,
    )
    root = tmp_path / "run"
    first = run_recipe(recipe, RunOptions(out_dir=str(root), **QUIET))
    found = root / "foundation/foundation"
    before = load_file(str(found / "step-000003/model.safetensors"))
    for p in (found / "summary.json", found / "heldout.json", root / "summary.json", root / "latest"):
        p.unlink(missing_ok=True)
    for p in root.glob("step-*"):  # the main model never got a checkpoint
        shutil.rmtree(p)
    res = run_recipe(recipe, RunOptions(out_dir=str(root), resume=True, **QUIET))
    assert res["steps"] == first["steps"] == 2 and (root / "step-000002").is_dir()
    after = load_file(str(found / "step-000003/model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # not retrained
    assert not (found / "step-000006").exists()


def test_a_foundation_is_trained_once_and_copied_into_a_run_that_would_train_it_alike(tmp_path, monkeypatch):
    """A curriculum and its naive baseline at one seed train the same foundation: the second copies the first's.
    The copy must give the very run that training it again gives; another seed, or ``reuse: false``, trains."""
    monkeypatch.setenv("AUDIOMOE_CACHE", str(tmp_path / "cache"))

    def run(out: str, seed: int = 0, joint_steps: int = 2, reuse: bool = True):
        stages = [
            {"name": "foundation", "steps": 3, "foundation": {"reuse": reuse}},
            {"name": "joint", "steps": joint_steps, "init": {"upcycle": "stage:foundation"}},
        ]
        recipe = _mini(stages, eval_batches=0, seed=seed).model_copy(update={"name": out})
        res = run_recipe(recipe, RunOptions(out_dir=str(tmp_path / out), **QUIET))
        return res["stages"][0]["foundation"], load_file(str(Path(res["checkpoint"]) / "model.safetensors"))

    stored = tmp_path / "cache" / "foundations"
    first, _ = run("curriculum")
    assert "reused" not in first and len(list(stored.iterdir())) == 1
    # another recipe name and a longer joint stage: only what comes after the foundation differs
    again, weights = run("naive", joint_steps=3)
    assert again["reused"] == str(next(stored.iterdir())) and again["final_loss"] == first["final_loss"]
    copied = tmp_path / "naive/foundation/foundation"
    assert json.loads((copied / "summary.json").read_text())["checkpoint"] == str(copied / "step-000003")
    assert not list(copied.glob(".lock"))
    trained, want = run("naive-trained", joint_steps=3, reuse=False)
    assert "reused" not in trained and len(list(stored.iterdir())) == 1
    assert set(weights) == set(want) and all(torch.equal(weights[k], want[k]) for k in want)
    other, _ = run("seed1", seed=1)
    assert "reused" not in other and len(list(stored.iterdir())) == 2
