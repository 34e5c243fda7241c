"""MoWE with pretrained weak encoders (train/weak_pretrain.py): pretrain, freeze, and the router learns to pick.

One real run on tones (module fixture): a mixture whose base carries nothing (its weights zeroed, so only the weak
pool informs), weak encoder 1 pretrained as a pitch specialist; stage ``route`` trains the data-independent router,
projections, adapter and head with the pool frozen; stage ``all`` trains everything it may.
"""

from __future__ import annotations

import pytest
import torch

import audiomoe
from audiomoe.core.errors import AudioMoEError
from audiomoe.train.checkpoint import load_checkpoint, save_checkpoint
from audiomoe.train.recipe import load_recipe
from audiomoe.train.trainer import RunOptions, run_recipe

SPEC = {
    "d_model": 16,
    "encoder": {
        "name": "mowe_mixture",
        "params": {
            "base": {
                "name": "whisper",
                "params": {"window": "trim", "config": {"d_model": 16, "max_source_positions": 50}},
            },
            "weak": [{"name": "hubert"}, {"name": "hubert"}, {"name": "hubert"}],
            "fusion": {
                "name": "concat",
                "params": {
                    "router_input": "pooled",
                    "router": {
                        "name": "mowe",
                        "params": {"scorer": {"name": "data_independent"}, "balance_weight": 1.0},
                    },
                },
            },
        },
    },
    "tasks": {"pitch": {"name": "classification", "params": {"num_classes": 6}}},
}
ROUTE_STEPS, ALL_STEPS = 60, 5


def _recipe(init: str, **stage) -> dict:
    first = {
        "name": "route",
        "steps": ROUTE_STEPS,
        "init": {"from_checkpoint": init},
        "freeze": ["encoder.base", "encoder.weak"],
        "weak_specialists": {"steps": 40, "encoders": {1: ["pitch"]}},
        **stage,
    }
    return {
        "model": {"spec": SPEC},
        "data": "tones",
        "batch_size": 16,
        "optim": {"lr": 3e-3, "grad_clip": 1.0},
        "eval": {"every": 1000, "batches": 2},
        "checkpoint": {"keep": 0},
        "log": {"jsonl": False, "tensorboard": False, "routing_every": 0},
        "stages": [first, {"name": "all", "steps": ALL_STEPS}],
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mowe_pre")
    model = audiomoe.compose(SPEC)
    with torch.no_grad():  # a base that carries nothing: what the model learns comes from the weak pool
        for p in model.encoder.base.parameters():
            p.zero_()
    init = save_checkpoint(model, root / "init", 0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    summary = run_recipe(load_recipe(_recipe(str(init))), RunOptions(out_dir=str(root / "run"), progress=False))
    return {
        "summary": summary,
        "initial": initial,
        "after_route": load_checkpoint(root / "run" / f"step-{ROUTE_STEPS:06d}"),
        "after_all": load_checkpoint(root / "run" / f"step-{ROUTE_STEPS + ALL_STEPS:06d}"),
    }


def _weak(state: dict, k: int) -> dict:
    return {n: t for n, t in state.items() if n.startswith(f"encoder.weak.{k}.")}


@pytest.mark.slow
def test_pretraining_changes_the_weak_encoder_and_later_stages_keep_it_frozen_bit_identical(run):
    init, mid, end = (
        _weak(run["initial"], 1),
        _weak(run["after_route"].state_dict(), 1),
        _weak(run["after_all"].state_dict(), 1),
    )
    changed = sum(float((mid[n].float() - init[n].float()).abs().sum()) for n in init if init[n].is_floating_point())
    assert changed > 1.0, "the weak_specialists stage did not train weak encoder 1"
    assert all(torch.equal(mid[n], end[n]) for n in mid), (
        "a later stage (train: all) changed the pretrained weak encoder"
    )
    a, b = run["after_route"].encoder.proj[1].weight, run["after_all"].encoder.proj[1].weight
    assert not torch.equal(a, b)  # stage `all` does train (weak 1's projection), only the pretrained encoder stays


@pytest.mark.slow
def test_the_pretrained_weak_encoder_predicts_its_task_above_chance(run):
    rep = run["summary"]["stages"][0]["weak_specialists"][0]
    pitch = rep["heldout"]["pitch"]
    assert rep["encoder"] == 1 and pitch["items"] >= 100
    assert pitch["interval"][0] > pitch["chance"] + 0.3, pitch  # 6 classes: chance 1/6


@pytest.mark.slow
def test_the_data_independent_router_learns_to_pick_the_informative_weak_encoder(run):
    scorer = run["after_route"].encoder.fusion.router.scorer
    probs = torch.softmax(scorer.table.detach() * scorer.params.logit_scale, -1)[0]
    assert int(probs.argmax()) == 1, probs
    assert float(probs.max()) > 1 / 3 + 0.09, f"top probability {float(probs.max()):.3f} stays near uniform 1/3"


def test_weak_specialists_errors_name_the_problem():
    model = audiomoe.compose(SPEC)
    from audiomoe.train.weak_pretrain import WeakSpecialistsSpec, pretrain_weak

    recipe = load_recipe(_recipe("unused"))
    with pytest.raises(AudioMoEError, match="index 5 but the mixture has 3 weak encoders"):
        pretrain_weak(model, WeakSpecialistsSpec(encoders={5: ["pitch"]}), recipe, "stages.0")
    with pytest.raises(AudioMoEError, match=r"task\(s\) \['speech'\] are not heads"):
        pretrain_weak(model, WeakSpecialistsSpec(encoders={0: ["speech"]}), recipe, "stages.0")
    plain = audiomoe.compose({**SPEC, "encoder": {"name": "hubert"}})
    with pytest.raises(AudioMoEError, match="has no weak pool"):
        pretrain_weak(plain, WeakSpecialistsSpec(encoders={0: ["pitch"]}), recipe, "stages.0")


def test_a_pretraining_is_reused_only_for_the_same_initial_weights_tasks_and_settings(tmp_path, monkeypatch):
    """A study's MoWE variants at one seed pretrain the same weak encoders: the second run loads the first's result."""
    from audiomoe.train.weak_pretrain import WeakSpecialistsSpec, pretrain_weak

    monkeypatch.setenv("AUDIOMOE_CACHE", str(tmp_path / "cache"))
    rec = load_recipe(_recipe("unused"))
    spec = WeakSpecialistsSpec(steps=3, warmup=1, encoders={1: ["pitch"]})

    def run(seed: int, s: WeakSpecialistsSpec = spec):
        model = audiomoe.compose({**SPEC, "seed": seed})
        before = {k: v.clone() for k, v in model.encoder.weak[1].state_dict().items()}
        (rep,) = pretrain_weak(model, s, rec, "stages.0")
        after = model.encoder.weak[1].state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)  # pretrained either way
        return rep, {k: v.clone() for k, v in after.items()}

    first, w1 = run(0)
    again, w2 = run(0)
    assert "reused" not in first and "reused" in again and again["heldout"] == first["heldout"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    other_init, _ = run(1)  # another spec seed: other initial weights, so trained anew
    longer, _ = run(0, WeakSpecialistsSpec(steps=4, warmup=1, encoders={1: ["pitch"]}))
    off, _ = run(0, WeakSpecialistsSpec(steps=3, warmup=1, encoders={1: ["pitch"]}, reuse=False))
    assert "reused" not in other_init and "reused" not in longer and "reused" not in off
    # other code (an edited pretraining loop) trains anew: the key covers the package's source
    monkeypatch.setattr("audiomoe.train.foundation_cache.source_digest", lambda: "edited")
    edited, _ = run(0)
    assert "reused" not in edited


def test_the_base_key_pretrains_a_plain_encoder_and_the_mixture_base_as_one_cached_run(tmp_path, monkeypatch):
    """MoWE's base is pretrained too: at one seed a plain Whisper (the base-only arm) and the mixture's base start from
    the same weights, so the second pretraining is the first one's, loaded; the plain encoder's prefix is ``encoder.``."""
    from audiomoe.train.weak_pretrain import WeakSpecialistsSpec, param_prefix, pretrain_weak

    monkeypatch.setenv("AUDIOMOE_CACHE", str(tmp_path / "cache"))
    rec = load_recipe(_recipe("unused"))
    spec = WeakSpecialistsSpec(steps=3, warmup=1, encoders={"base": ["pitch"]})
    mixture = audiomoe.compose(SPEC)
    plain = audiomoe.compose({**SPEC, "encoder": SPEC["encoder"]["params"]["base"]})
    assert all(torch.equal(v, plain.encoder.state_dict()[k]) for k, v in mixture.encoder.base.state_dict().items())
    before = {k: v.clone() for k, v in mixture.encoder.base.state_dict().items()}
    (first,) = pretrain_weak(mixture, spec, rec, "stages.0")
    (second,) = pretrain_weak(plain, spec, rec, "stages.0")
    assert first["encoder"] == "base" and "reused" not in first and "reused" in second
    after = mixture.encoder.base.state_dict()
    moved = sum(
        float((after[k].float() - before[k].float()).abs().sum()) for k in before if before[k].is_floating_point()
    )
    assert moved > 1.0, "the base encoder did not train"
    assert all(torch.equal(v, plain.encoder.state_dict()[k]) for k, v in after.items())
    assert param_prefix(mixture, "base") == "encoder.base." and param_prefix(plain, "base") == "encoder."
    assert param_prefix(mixture, 2) == "encoder.weak.2."
    with pytest.raises(ValueError, match="'base' or an index"):
        WeakSpecialistsSpec(encoders={-1: ["pitch"]})


def test_parts_after_the_encoder_share_their_initial_weights_across_configs_at_one_seed():
    """Two configs that differ in the encoder (another router) start their heads and adapter alike at one seed (a
    paired study difference is not also an initialisation difference); another seed gives other weights."""
    other_router = {
        **SPEC,
        "encoder": {**SPEC["encoder"], "params": {**SPEC["encoder"]["params"], "weak": [{"name": "hubert"}]}},
    }
    a, b, c = audiomoe.compose(SPEC), audiomoe.compose(other_router), audiomoe.compose({**SPEC, "seed": 1})
    ha, hb, hc = (m.heads["pitch"].state_dict() for m in (a, b, c))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    assert all(not torch.equal(ha[k], hc[k]) for k in ha if ha[k].numel() > 1)
    assert sum(p.numel() for p in a.encoder.parameters()) != sum(p.numel() for p in b.encoder.parameters())
