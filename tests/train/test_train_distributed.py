"""The recipe's ``distributed:`` through ``audiomoe train`` on real torchrun processes (2 gloo ranks, 127.0.0.1).

One tiny MoE recipe (``tiny-unimoe``: 8 routed + 1 null + 2 gated shared experts per block, top-p;
two stages, the second freezing the encoder; clipping that acts) is trained for 4 steps in one
process and with ``distributed: {expert_parallel: 2}`` (DDP + EP) and ``{expert_parallel: 2, fsdp: true}``
(FSDP2 + EP) on 2 processes with the same global batch. The loss must split over ranks exactly, so the
model has one head and no batch-level aux loss (a load-balancing loss over a rank's tokens is not the
one over the global batch). AdamW ``eps`` is 1e-6: the attention key bias gets a gradient that is zero
by construction (softmax ignores a per-query constant), only rounding noise (~1e-10) that differs
between layouts, and Adam with eps 1e-8 turns that noise into a +-lr step (measured: 1.2e-4 apart
after 4 steps); 1e-6 keeps such noise below a visible step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from audiomoe import cli
from audiomoe.core.batch import AudioBatch
from audiomoe.train import load_checkpoint, load_trainer_state
from audiomoe.train.distributed import free_port
from audiomoe.train.recipe import load_recipe
from audiomoe.train.trainer import RunOptions, run_recipe

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
if Path("/sys/class/net/lo").exists():
    ENV.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on the loopback device
RECIPE = {
    "name": "ep-tiny",
    "data": "tones",
    "batch_size": 8,
    "model": {
        "preset": "tiny-unimoe",
        "overrides": [
            "tasks.speaker=null",
            "backbone.moe.router.unimoe_aux_weight=0.0",
            "backbone.moe.router.unimoe_aux_weight_end=0.0",
        ],
    },
    "optim": {"lr": 3e-3, "eps": 1e-6, "grad_clip": 1.0},
    "eval": {"every": 2, "batches": 1},
    "log": {"routing_every": 2},
    "checkpoint": {"every": 1, "keep": 0},
    "distributed": {"expert_parallel": 2},
    "stages": [{"name": "a", "steps": 2}, {"name": "b", "steps": 2, "freeze": ["encoder"]}],
}
STEPS, TOL = 4, 1e-5


def _audiomoe(*args: str, torchrun: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    """``audiomoe ARGS`` in a subprocess; ``torchrun``: under ``python -m torch.distributed.run`` with 2 processes."""
    launch = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            "--nnodes=1",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
        ]
        if torchrun
        else [sys.executable]
    )
    res = subprocess.run(
        [*launch, "-m", "audiomoe", *args], env=ENV, capture_output=True, text=True, timeout=300, cwd=str(ROOT)
    )
    if check:
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return res


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"step-{step:06d}" / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{name: run dir}``: ``one`` (one process), ``ep`` (torchrun, EP 2 + DDP), ``fsdp`` (``--nproc 2``, EP 2 + FSDP2)."""
    root = tmp_path_factory.mktemp("dist")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    # the same recipe in one process: the layout is not part of what is trained
    run_recipe(
        load_recipe(str(recipe), ["distributed.expert_parallel=1"]),
        RunOptions(out_dir=str(root / "one"), progress=False, device="cpu"),
    )
    _audiomoe("train", str(recipe), "--out", str(root / "ep"), "--device", "cpu", "--quiet", torchrun=True)
    # FSDP also re-inits stage b from its own step-2 checkpoint: a later stage's init runs on a gathered
    # full copy and is loaded back into the shards (layout.on_full_model); the weights must come back whole
    _audiomoe(
        "train",
        str(recipe),
        "--set",
        "distributed.fsdp=true",
        "--set",
        f"stages.b.init.from_checkpoint={root / 'fsdp' / 'step-000002'}",
        "--nproc",
        "2",
        "--out",
        str(root / "fsdp"),
        "--device",
        "cpu",
        "--quiet",
    )
    return {"recipe": recipe, **{name: root / name for name in ("one", "ep", "fsdp")}}


@pytest.mark.parametrize("layout", ["ep", "fsdp"])
def test_two_processes_with_expert_parallel_match_one_process(runs, layout):
    a, b = _losses(runs["one"]), _losses(runs[layout])
    assert len(a) == len(b) == STEPS
    loss_diff = max(abs(x - y) for x, y in zip(a, b))
    weight_diff = max(_max_diff(_weights(runs["one"], s), _weights(runs[layout], s)) for s in (2, STEPS))
    first, last = _weights(runs["one"], 1), _weights(runs["one"], STEPS)
    moved = max(
        float((first[k] - last[k]).abs().max()) for k in first if first[k].is_floating_point()
    )  # not the step counters
    print(f"{layout}: loss diff {loss_diff:.2e}, weight diff {weight_diff:.2e} (moved {moved:.2e})")
    assert loss_diff < TOL and weight_diff < TOL and moved > 1e-3, (a, b)
    summary = json.loads((runs[layout] / "summary.json").read_text())
    assert summary["layout"] == {"world": 2, "data_parallel": 1, "expert_parallel": 2, "fsdp": layout == "fsdp"}
    norms = [
        r["grad_norm"] for r in map(json.loads, (runs[layout] / "log.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert max(norms) > RECIPE["optim"]["grad_clip"], "clipping must act, so a wrong gradient scale would show"
    assert "eval" in summary["stages"][-1], "every rank evaluated (a sharded forward is collective); rank 0 recorded it"
    if layout == "fsdp":
        assert (
            summary["stages"][1]["init"]["loaded"] == len(_weights(runs["one"], 2))
            and not summary["stages"][1]["init"]["missing"]
        )


def test_ep2_checkpoint_is_one_process_files_that_load_with_load_checkpoint(runs):
    """The EP-2 run's checkpoint: every expert once as a full tensor, the spec as given; outputs = the one-process run's."""
    ep, one = load_checkpoint(runs["ep"]), load_checkpoint(runs["one"])
    assert ep.spec == one.spec and ep.spec["backbone"]["params"]["moe"]["params"]["expert_parallel"] == 1  # layout-free
    g = torch.Generator().manual_seed(7)
    batch = AudioBatch(torch.randn(3, 8000, generator=g), 16000, "emotion", torch.tensor([8000, 6000, 4000]), [0, 1, 3])
    with torch.no_grad():
        a, b = ep.eval()(batch), one.eval()(batch)
    out_diff = float((a.outputs["emotion"] - b.outputs["emotion"]).abs().max())  # the head's logits [3, 4]
    print(
        f"one-process outputs of the EP-2 checkpoint vs the one-process run's: {out_diff:.2e}, loss {abs(float(a.loss - b.loss)):.2e}"
    )
    assert out_diff < TOL and abs(float(a.loss - b.loss)) < TOL and float(a.loss) > 0.1
    opt = load_trainer_state(runs["ep"])["optimizer"]["state"]
    stacked = [v["exp_avg"].shape for v in opt.values() if v["exp_avg"].dim() == 3]
    assert stacked and all(s[0] in (8, 2) for s in stacked), (
        "AdamW moments of all 8 routed experts (and the 2 shared), gathered"
    )
    assert not list(runs["ep"].rglob("*.pt")) and not list(runs["ep"].rglob("*.pkl"))


def _as_killed_after(src: Path, dst: Path, step: int) -> None:
    """``dst``: ``src`` as a ``kill -9`` right after step ``step``'s checkpoint leaves it (later steps, summary gone)."""
    shutil.copytree(src, dst)
    for s in range(step + 1, STEPS + 1):
        shutil.rmtree(dst / f"step-{s:06d}")
    (dst / "summary.json").unlink()
    (dst / "latest").write_text(f"step-{step:06d}\n")


def test_resume_of_the_ep2_run_with_nproc_2_ends_equal_to_the_unbroken_run(runs, tmp_path):
    """Mid-stage (step 3 of 4: the sharded AdamW state is loaded back), through ``--nproc 2``: bit-identical."""
    out = tmp_path / "resumed"
    _as_killed_after(runs["ep"], out, 3)
    _audiomoe("train", "--resume", str(out), "--nproc", "2", "--device", "cpu", "--quiet")
    a, b = _weights(runs["ep"], STEPS), _weights(out, STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(out) == _losses(runs["ep"])
    assert json.loads((out / "summary.json").read_text())["start_step"] == 3


def test_ep2_run_resumes_in_one_process_at_expert_parallel_1(runs, tmp_path):
    """A checkpoint is layout-free: the EP-2 run continued in one process ends as the one-process run (1e-5)."""
    out = tmp_path / "one-process"
    _as_killed_after(runs["ep"], out, 3)
    with pytest.warns(RuntimeWarning, match="2-process run with 1 processes"):
        run_recipe(
            load_recipe(str(runs["recipe"]), ["distributed.expert_parallel=1"]),
            RunOptions(out_dir=str(out), resume=True, progress=False, device="cpu"),
        )
    assert _max_diff(_weights(runs["one"], STEPS), _weights(out, STEPS)) < TOL


@pytest.mark.parametrize(
    "change, args, message",
    [
        (
            {},
            ["--expert-parallel", "3"],
            r"distributed.expert_parallel=3 does not divide backbone.moe.num_experts=8: .* \[1, 2, 4, 8\]",
        ),
        (
            {"distributed": {}},
            ["--fsdp"],
            r"fsdp needs several processes, but this is one process .*audiomoe train RECIPE --nproc 2",
        ),
        (
            {},
            [],
            r"expert_parallel=2 needs several processes.*--nproc 2 \(or torchrun --nproc-per-node 2 -m audiomoe train",
        ),
        (
            {},
            ["--set", "backbone.moe.expert_parallel=4"],
            r"distributed.expert_parallel=2 but the model spec sets backbone.moe.expert_parallel=4",
        ),
        (
            {"model": {"preset": "tiny-cls"}},
            [],
            r"distributed.expert_parallel=2: this model has no MoE layer \(backbone.moe\)",
        ),
    ],
)
def test_layouts_that_cannot_run_are_refused_in_one_process(tmp_path, capsys, change, args, message):
    import re

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, **change}))
    assert cli.main(["train", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "run" / "run.json").exists()  # refused before the run started


def test_world_size_not_a_multiple_of_expert_parallel_is_refused_under_torchrun(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "distributed": {"expert_parallel": 4}}))
    res = _audiomoe(
        "train", str(recipe), "--nproc", "2", "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet", check=False
    )
    assert res.returncode != 0
    assert (
        "world size 2 is not a multiple of distributed.expert_parallel=4" in res.stderr
        and "--nproc-per-node 4" in res.stderr
    ), res.stderr[-2000:]
    assert not (tmp_path / "run" / "run.json").exists()


def test_data_parallel_times_expert_parallel_must_be_the_world_size():
    """``world = data_parallel x expert_parallel`` (checked without processes: the planner takes the world size)."""
    from audiomoe.core.composer import resolve
    from audiomoe.core.errors import AudioMoEError
    from audiomoe.train.layout import plan_layout
    from audiomoe.train.recipe import DistributedSpec

    spec = resolve("tiny-unimoe").to_dict()
    lay = plan_layout(DistributedSpec(expert_parallel=2), spec, 4)
    assert (lay.data_parallel, lay.expert_parallel, lay.sharded) == (2, 2, True)
    assert lay.build_spec(spec)["backbone"]["params"]["moe"]["params"][
        "expert_parallel"
    ] == 2 and spec != lay.build_spec(spec)
    with pytest.raises(
        AudioMoEError, match=r"data_parallel=2 x expert_parallel=2 = 4 processes, but 2 were started; run .*--nproc 4"
    ):
        plan_layout(DistributedSpec(expert_parallel=2, data_parallel=2), spec, 2)
    assert not plan_layout(DistributedSpec(), spec, 2).sharded  # plain DDP
