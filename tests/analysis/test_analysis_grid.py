"""Grid / variant expansion, study files and the built-in papers study (no training: fast)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from audiomoe.analysis.grid import expand, parse_grid, parse_variant, plan_runs, split_values
from audiomoe.analysis.launch import train_command
from audiomoe.analysis.study import STUDIES, builtin_studies, find_study, load_study, plan_study
from audiomoe.core.errors import AudioMoEError


def test_grid_values_split_outside_brackets_and_bad_grids_are_named():
    assert split_values("top_k, top_p") == ["top_k", "top_p"]
    assert split_values("[a,b],{x: 1, y: 2},'c,d'") == ["[a,b]", "{x: 1, y: 2}", "'c,d'"]
    assert parse_grid("backbone.moe.router.p=0.5,0.7") == ("backbone.moe.router.p", ["0.5", "0.7"])
    for bad, what in (
        ("backbone.moe.router", "KEY=V1,V2"),
        ("=a,b", "KEY=V1,V2"),
        ("k=a,,b", "non-empty"),
        ("k=a,a", "twice"),
    ):
        with pytest.raises(AudioMoEError, match=what):
            parse_grid(bad)


def test_variants_bundle_overrides_and_bad_variants_are_named():
    assert parse_variant("naive=backbone.moe.router=top_k;backbone.moe.num_null=0") == (
        "naive",
        ["backbone.moe.router=top_k", "backbone.moe.num_null=0"],
    )
    assert parse_variant("plain=") == ("plain", [])
    with pytest.raises(AudioMoEError, match="NAME=KEY=VALUE"):
        parse_variant("bad name=x=1")
    with pytest.raises(AudioMoEError, match="not KEY=VALUE"):
        parse_variant("v=backbone.moe.router")


def test_expand_is_the_product_of_variants_and_grid(tmp_path):
    grids = [parse_grid("backbone.moe.router=top_k,top_p"), parse_grid("backbone.moe.num_experts=2,4")]
    configs = expand("tiny-moe-cls", grids, overrides=["seed=1"], train={"lr": 0.01}, steps=5)
    assert [c.name for c in configs] == [
        "router=top_k+num_experts=2",
        "router=top_k+num_experts=4",
        "router=top_p+num_experts=2",
        "router=top_p+num_experts=4",
    ]
    assert configs[1].overrides == ("seed=1", "backbone.moe.router=top_k", "backbone.moe.num_experts=4")
    assert dict(configs[0].labels) == {"router": "top_k", "num_experts": "2"}
    both = expand("t", [parse_grid("a.router=x,y"), parse_grid("b.router=z")])  # same last key part: full keys in names
    assert both[0].name == "a.router=x+b.router=z"
    with_variants = expand("t", [parse_grid("k=1,2")], [("v1", ["x=1"]), ("v2", [])])
    assert [c.name for c in with_variants] == ["v1+k=1", "v1+k=2", "v2+k=1", "v2+k=2"]
    runs = plan_runs(configs, [0, 1], tmp_path)
    assert len(runs) == 8 and len({r.path for r in runs}) == 8
    assert runs[0].path == tmp_path / "runs" / "router=top_k+num_experts=2" / "seed-0"
    odd = expand("t", [parse_grid("tasks.x.labels=[a/b,c]")])[0]
    assert "/" not in odd.dirname and odd.dirname != odd.name  # unsafe characters replaced, a hash keeps it unique
    with pytest.raises(AudioMoEError, match="more than once"):
        expand("t", [parse_grid("k=1"), parse_grid("k=2")])
    with pytest.raises(AudioMoEError, match="unknown training option.*'lr'"):
        expand("t", train={"lrr": 1})
    with pytest.raises(AudioMoEError, match="at least one seed"):
        plan_runs(configs, [], tmp_path)


def test_train_command_passes_overrides_seed_steps_and_overwrites_an_unfinished_run(tmp_path):
    (cfg,) = expand("tiny-moe-cls", [parse_grid("backbone.moe.router=top_p")], train={"batch_size": 4}, steps=50)
    (run,) = plan_runs([cfg], [3], tmp_path)
    cmd = train_command(run, python="python")
    assert cmd[:5] == ["python", "-m", "audiomoe.cli", "train", "tiny-moe-cls"]
    joined = " ".join(cmd)
    assert (
        "--set backbone.moe.router=top_p" in joined
        and "--seed 3" in joined
        and "--steps 50" in joined
        and "--batch-size 4" in joined
    )
    assert f"--out {run.path / 'train'}" in joined and "--overwrite" not in cmd
    (run.path / "train").mkdir(parents=True)  # a killed run left its directory: start it over
    assert train_command(run)[-1] == "--overwrite"


def test_papers_study_plans_the_paper_arms_and_skips_the_curriculum_placeholder(tmp_path):
    assert "papers" in builtin_studies() and find_study("papers") == STUDIES / "papers.yaml"
    spec = load_study(STUDIES / "papers.yaml")
    plan = plan_study(spec, tmp_path, exists=lambda name: False)
    routing = ["top_k", "top_k_ent", "top_p_null", "top_p_null_ent", "frozen_encoder"]
    encoders = ["base_only", "mowe_independent", "mowe_dependent", "mowe_combined", "mowe_two_dependent"]
    assert [c.name for c in plan.configs] == routing + encoders
    assert plan.seeds == [0, 1, 2, 3] and plan.baselines == {"routing": "top_k", "encoders": "base_only"}
    assert "unimoe-curriculum-tiny" in plan.skipped["curriculum"] and "skipped only where" in plan.skipped["curriculum"]
    assert (tmp_path / "specs" / "unimoe-corpus.yaml").is_file() and plan.configs[0].target == str(
        tmp_path / "specs" / "unimoe-corpus.yaml"
    )
    assert {c.target for c in plan.configs if c.arm == "encoders"} == {"mowe-corpus-tiny"}  # pretrained weak encoders
    compact = plan_study(spec, tmp_path, compact=True, exists=lambda name: False)
    assert compact.seeds == [0, 1, 2, 3] and compact.configs[0].steps == spec.compact.steps < spec.steps
    assert [c.name for c in compact.configs] == [
        "top_k",
        "top_k_ent",
        "top_p_null_ent",
        "frozen_encoder",
    ]  # the control's pair
    with_recipes = plan_study(
        spec, tmp_path, exists=lambda name: True
    )  # once issue 15's recipes exist, the arm runs them
    cur = [c for c in with_recipes.configs if c.arm == "curriculum"]
    assert [(c.name, c.target, c.steps) for c in cur] == [
        ("curriculum", "unimoe-curriculum-tiny", None),
        ("naive", "unimoe-naive-tiny", None),
        ("naive_balanced", "unimoe-naive-tiny", None),  # claim 5: the balanced mix without specialists
    ]
    assert cur[2].overrides[-1] == "stages.joint.data.temperature=0.0"
    assert with_recipes.skipped == {}
    assert plan.seeds_of("routing") == list(range(15)) and plan.seeds_of("encoders") == [0, 1, 2, 3]  # claim 4 power
    assert plan.seeds_of("routing", "frozen_encoder") == [0, 1, 2] and plan.seeds_of("routing", "top_p_null") == [0, 1]
    assert with_recipes.seeds_of("curriculum", "naive") == list(range(5))  # claim 3's non-inferiority power
    assert not compact.config_seeds  # the compact form runs every config at its own seed count
    assert plan.task_groups == {"speech": ["language", "speaker", "style"]}  # claim 3's majority domain


def test_papers_study_variants_are_valid_model_specs(tmp_path):
    """Every config of the built-in study passes the train command's own pre-launch check (recipe, overrides, model on
    the meta device, data), as `audiomoe ablate` checks it before its first run."""
    from audiomoe.analysis.launch import check_runs

    plan = plan_study(load_study(STUDIES / "papers.yaml"), tmp_path)
    assert len(plan.configs) == 13 and not plan.skipped
    check_runs(plan.runs(tmp_path))


def test_bad_study_files_say_what_is_wrong(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("study: s\narms:\n  a:\n    target: tiny-cls\n    variants: {x: []}\n    baseline: y\n")
    with pytest.raises(AudioMoEError, match="baseline 'y' is not one of its variants"):
        load_study(p)
    p.write_text("study: s\narms:\n  a:\n    target: tiny-cls\n    variants: {x: []}\n    colour: red\n")
    with pytest.raises(AudioMoEError, match=r"arms\.a\.colour"):
        load_study(p)
    p.write_text(
        "study: s\narms:\n  a: {target: tiny-cls, variants: {x: []}}\nclaims:\n  - {id: 1, text: t, kind: better, candidate: x, reference: [nope]}\n"
    )
    with pytest.raises(AudioMoEError, match="claim 1 names 'nope'"):
        load_study(p)
    assert find_study(str(p)) == p and find_study("tiny-cls") is None


def test_ablate_refuses_bad_input_with_a_message():
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "audiomoe.cli", "ablate", *args], capture_output=True, text=True, timeout=120
        )

    r = run("papers", "--grid", "k=1,2")
    assert r.returncode == 2 and "is a study file" in r.stderr
    r = run("tiny-cls", "--grid", "seed=1,2", "--baseline", "seed=3")
    assert r.returncode == 2 and "--baseline 'seed=3' is not one of the configs" in r.stderr
    r = run("tiny-cls", "--grid", "nokey")
    assert r.returncode == 2 and "KEY=V1,V2" in r.stderr


def test_compact_form_runs_only_its_variants_and_claims_on_the_others_say_not_measured(tmp_path):
    import yaml

    from audiomoe.analysis.claims import evaluate_claims

    data = yaml.safe_load((STUDIES / "papers.yaml").read_text())
    assert data["compact"]["variants"] == [
        "top_k",
        "frozen_encoder",
        "top_k_ent",
        "top_p_null_ent",
    ]  # the demo: routing only
    data["compact"]["variants"] = ["top_k", "top_p_null", "base_only", "mowe_combined", "curriculum", "naive"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_study(tmp_path / "s.yaml")
    plan = plan_study(spec, tmp_path, compact=True, exists=lambda name: True)
    assert [c.name for c in plan.configs] == spec.compact.variants
    assert plan.baselines == {"routing": "top_k", "encoders": "base_only", "curriculum": "naive"}
    left = {
        "top_k_ent": "routing",
        "top_p_null_ent": "routing",
        "frozen_encoder": "routing",
        "mowe_independent": "encoders",
        "mowe_dependent": "encoders",
        "mowe_two_dependent": "encoders",
        "naive_balanced": "curriculum",
    }
    assert plan.skipped_configs == {k: f"{v} (compact)" for k, v in left.items()}
    assert (
        "left out of the compact form" in plan.skipped["encoders (compact)"]
        and "audiomoe ablate papers" in plan.skipped["encoders (compact)"]
    )
    rows = [
        {"config": c.name, "seed": s, "status": "ok", "mean/accuracy": 0.3 + 0.01 * s}
        for c in plan.configs
        for s in plan.seeds
    ]
    verdicts = {v["id"]: v for v in evaluate_claims(spec.claims, rows, plan.metric, plan.arm_of(), plan.skipped)}
    assert verdicts[2]["verdict"] == "not measured" and "left out of the compact form" in verdicts[2]["plain"]
    assert verdicts[1]["verdict"] != "not measured" and verdicts[3]["verdict"] != "not measured"
    data["compact"]["variants"] = None  # every config, compact: the curriculum's compact steps
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    demo = plan_study(load_study(tmp_path / "s.yaml"), tmp_path, compact=True, exists=lambda name: True)
    assert len(demo.configs) == 13 and demo.skipped == {}
    cur = {c.name: c.overrides for c in demo.configs if c.arm == "curriculum"}
    assert (
        "stages.joint.steps=120" in cur["naive"] and "stages.foundation.steps=60" in cur["curriculum"]
    )  # as many steps
    assert (
        "domains.sound.proportion=1" in cur["naive"] and "domains.sound.proportion=1" in cur["curriculum"]
    )  # one imbalance


def test_compact_variants_must_name_variants_and_keep_each_kept_arms_baseline(tmp_path):
    p = tmp_path / "s.yaml"
    body = "study: s\narms:\n  a: {target: tiny-cls, baseline: x, variants: {x: [], y: []}}\n  b: {target: tiny-cls, variants: {z: []}}\n"
    p.write_text(body + "compact: {variants: [x, w]}\n")
    with pytest.raises(AudioMoEError, match="compact.variants names 'w'"):
        load_study(p)
    p.write_text(body + "compact: {variants: [y]}\n")
    with pytest.raises(AudioMoEError, match="not its baseline 'x'"):
        load_study(p)
    p.write_text(body + "compact: {variants: [x]}\n")
    plan = plan_study(load_study(p), tmp_path, compact=True)
    assert [c.name for c in plan.configs] == ["x"] and set(plan.skipped) == {
        "a (compact)",
        "b",
    }  # a whole arm left out is skipped by name
    assert plan.arm_of() == {"x": "a", "y": "a (compact)", "z": "b"}


def test_a_run_of_a_sweep_can_itself_be_distributed(tmp_path):
    """``--train nproc=2`` makes each run ``audiomoe train ... --nproc 2`` (torchrun's launcher), a command the CLI accepts."""
    from audiomoe.cli import build_parser

    (cfg,) = expand("tiny-moe-cls", [], train={"nproc": 2, "expert_parallel": 2}, steps=5)
    (run,) = plan_runs([cfg], [0], tmp_path)
    cmd = train_command(run, python="python")
    assert "--nproc 2" in " ".join(cmd) and "--expert-parallel 2" in " ".join(cmd)
    args = build_parser().parse_args(cmd[3:])
    assert args.nproc == 2


def test_a_run_trained_with_other_settings_is_stale_not_finished(tmp_path):
    """Same --out, another --steps or --set: the old run's results are not this plan's (trained again, not skipped)."""
    import json

    from audiomoe.analysis.launch import SETTINGS_FILE, run_settings, run_state

    def run_of(steps, grid="backbone.moe.router=top_p"):
        (cfg,) = expand("tiny-moe-cls", [parse_grid(grid)], steps=steps)
        return plan_runs([cfg], [0], tmp_path)[0]

    old = run_of(20)
    (old.path / "train").mkdir(parents=True)
    (old.path / "train" / "summary.json").write_text("{}")
    (old.path / SETTINGS_FILE).write_text(json.dumps(run_settings(old)))
    assert run_state(old) == "trained" and "--overwrite" not in run_settings(
        old
    )  # same settings: only its measurement is missing
    assert run_of(40).path == old.path and run_state(run_of(40)) == "stale"
    with_set = expand(
        "tiny-moe-cls", [parse_grid("backbone.moe.router=top_p")], steps=20, overrides=["backbone.moe.num_experts=8"]
    )
    assert run_state(plan_runs(with_set, [0], tmp_path)[0]) == "stale"


def test_a_studys_seeds_give_different_initial_weights(tmp_path):
    """The study seed reaches the spec's ``seed`` (the initial weights), not only the data order: two seeds of one
    config compose different models through the train command's own ``--set`` path; the same seed the same model."""
    import torch

    from audiomoe.cli import build_parser
    from audiomoe.core.composer import build_model
    from audiomoe.train.recipe import recipe_for_preset

    (cfg,) = expand("tiny-moe-cls", [parse_grid("backbone.moe.router=top_p")], steps=5)

    def first_weights(seed: int) -> dict[str, torch.Tensor]:
        (run,) = plan_runs([cfg], [seed], tmp_path)
        args = build_parser().parse_args(train_command(run, python="python")[3:])
        assert f"seed={seed}" in args.set
        spec = recipe_for_preset(args.target, overrides=args.set, steps=1).model.resolve()
        model = build_model(spec)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    a, b, a2 = first_weights(0), first_weights(1), first_weights(0)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert len(differ) > 0.8 * len(a), f"only {len(differ)} of {len(a)} tensors differ between seeds 0 and 1"
    assert all(torch.equal(a[k], a2[k]) for k in a)
    pinned = expand("tiny-moe-cls", [], overrides=["seed=7"])[0]
    (run,) = plan_runs([pinned], [2], tmp_path)
    assert "seed=2" not in train_command(run)  # a config that pins its init keeps it


def _planned(root, text: str):
    """(study spec, plan) of the study file ``text`` written under ``root`` (every recipe taken as present)."""
    p = root / "s.yaml"
    p.write_text(text)
    spec = load_study(p)
    return spec, plan_study(spec, root, exists=lambda name: True)


def _seeds_per_config(plan, root) -> dict[str, list[int]]:
    per: dict[str, list[int]] = {}
    for r in plan.runs(root):
        per.setdefault(r.config.name, []).append(r.seed)
    return per


def test_an_arm_can_run_more_seeds_than_the_study(tmp_path):
    """A claim that needs the power gets more seeds in its arm only; --seeds and the compact form set every arm's."""
    from audiomoe.analysis.ablate import load_plan, save_plan

    spec, plan = _planned(
        tmp_path,
        "study: s\nseeds: 2\narms:\n  a: {target: tiny-cls, variants: {x: [], y: []}}\n"
        "  b: {target: tiny-cls, seeds: 5, variants: {z: [], w: []}}\n",
    )
    runs = plan.runs(tmp_path)
    assert _seeds_per_config(plan, tmp_path) == {"x": [0, 1], "y": [0, 1], "z": [0, 1, 2, 3, 4], "w": [0, 1, 2, 3, 4]}
    assert plan.seeds_text() == "2-5 seeds (a 2, b 5)"
    save_plan(plan, tmp_path, {})
    again, _ = load_plan(tmp_path)
    assert [(r.config.name, r.seed) for r in again.runs(tmp_path)] == [(r.config.name, r.seed) for r in runs]
    assert len(plan_study(spec, tmp_path, seeds=3, exists=lambda name: True).runs(tmp_path)) == 4 * 3
    assert len(plan_study(spec, tmp_path, compact=True, exists=lambda name: True).runs(tmp_path)) == 4 * 2


def test_a_variant_can_run_fewer_seeds_than_its_arm(tmp_path):
    """A config no claim's power rests on (a control's crippled arm) runs fewer seeds; the pairs use the common seeds."""
    from audiomoe.analysis.ablate import load_plan, save_plan

    spec, plan = _planned(
        tmp_path,
        "study: s\nseeds: 2\narms:\n  a: {target: tiny-cls, seeds: 6, variants: {x: [], y: {set: [], seeds: 3}}}\n"
        "  b: {target: tiny-cls, variants: {z: []}}\n",
    )
    p = tmp_path / "s.yaml"
    assert _seeds_per_config(plan, tmp_path) == {"x": [0, 1, 2, 3, 4, 5], "y": [0, 1, 2], "z": [0, 1]}
    assert plan.seeds_text() == "2-6 seeds (a 3-6, b 2)"
    save_plan(plan, tmp_path, {})
    assert load_plan(tmp_path)[0].runs(tmp_path) == plan.runs(tmp_path)  # plan.json keeps the variant's seeds
    assert len(plan_study(spec, tmp_path, seeds=4, exists=lambda name: True).runs(tmp_path)) == 3 * 4  # --seeds: all
    p.write_text("study: s\narms:\n  a: {target: tiny-cls, variants: {y: {set: [], seeds: 0}}}\n")
    with pytest.raises(AudioMoEError, match="seeds"):
        load_study(p)


def test_task_groups_add_a_mean_column_per_group_and_survive_the_plan_file(tmp_path):
    """A study's ``task_groups`` (e.g. a domain's tasks) give each run ``<group>/<metric>``: the mean over those
    tasks, so one non-inferiority test can cover a whole majority domain."""
    from audiomoe.analysis.ablate import load_plan, save_plan
    from audiomoe.analysis.results import add_groups

    p = tmp_path / "s.yaml"
    p.write_text(
        "study: s\ntask_groups: {speech: [language, speaker]}\narms:\n  a: {target: tiny-cls, variants: {x: []}}\n"
    )
    plan = plan_study(load_study(p), tmp_path, exists=lambda name: True)
    save_plan(plan, tmp_path, {})
    assert load_plan(tmp_path)[0].task_groups == {"speech": ["language", "speaker"]}
    row = {"language/accuracy": 0.2, "speaker/accuracy": 0.5, "event/accuracy": 0.9, "language/macro_f1": 0.1}
    add_groups(row, plan.task_groups)
    assert row["speech/accuracy"] == pytest.approx(0.35)
    assert "speech/macro_f1" not in row  # speaker has no macro_f1 here: no mean over part of the group
    with pytest.raises(AudioMoEError, match="'language' is also a task's name"):
        add_groups({"language/accuracy": 0.2}, {"language": ["language"]})
    p.write_text("study: s\ntask_groups: {mean: [language]}\narms:\n  a: {target: tiny-cls, variants: {x: []}}\n")
    with pytest.raises(AudioMoEError, match=r"task_groups\.mean: give a name"):
        load_study(p)
