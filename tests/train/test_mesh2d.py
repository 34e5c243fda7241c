"""The 2-D expert x data device mesh (:mod:`audiomoe.train.mesh2d`) on 4 real gloo processes (EP 2 x DP 2) vs one process.

One ``torchrun --nproc_per_node 4`` of ``tests/helpers/mesh2d_worker.py`` lays out W.Tiny (float64) and the
``tiny-unimoe`` preset (float32, meta-device init through the recipe's :class:`Layout`) on the ``(dp, ep)``
mesh, trains two AdamW steps next to a one-process model fed the 4 ranks' batches, saves a full checkpoint
and reloads it in one process and at the 2-D layout. Shapes that cannot run are checked without processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from audiomoe.core.errors import AudioMoEError
from audiomoe.train.distributed import free_port
from audiomoe.train.layout import Layout, plan_layout
from audiomoe.train.mesh2d import device_mesh_2d
from audiomoe.train.recipe_sections import DistributedSpec

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "helpers" / "mesh2d_worker.py"
NPROC = 4


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    """``(results per rank, output dir)`` of one 4-rank torchrun of the worker."""
    out = tmp_path_factory.mktemp("mesh2d")
    # the checkout first: the workers must import this audiomoe, whatever editable install the interpreter has
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={NPROC}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(WORKER),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(ROOT))
    if proc.returncode:
        pytest.fail(f"torchrun worker failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(NPROC)], out


@pytest.mark.parametrize("case", ["tiny", "composed"])
def test_groups_follow_the_dp_x_ep_mesh_and_experts_are_sharded_over_dp(mesh_run, case):
    for rank, res in enumerate(mesh_run[0]):
        r = res[case]
        assert r["ep_ranks"] == [rank - rank % 2, rank - rank % 2 + 1], r  # all-to-all inside consecutive pairs
        assert r["dp_ranks"] == [rank % 2, rank % 2 + 2], r  # the ranks holding the same expert block
        assert r["expert_is_dtensor"] and r["dense_is_dtensor"]
        glob, local = r["expert_global_shape"], r["expert_local_shape"]
        assert glob[0] * 2 == (4 if case == "tiny" else 8) and local[0] * 2 == glob[0] and local[1:] == glob[1:], r
    assert mesh_run[0][0]["tiny"]["mesh"] == {"shape": [2, 2], "names": ["dp", "ep"]}


@pytest.mark.parametrize("case, tol", [("tiny", 1e-9), ("composed", 1e-5)])
def test_four_ranks_ep2_dp2_equal_one_process_in_outputs_gradients_and_two_steps(mesh_run, case, tol):
    """Outputs, the loss, every parameter's gathered gradient, clip norms, and the weights after 2 AdamW steps."""
    for r in (res[case] for res in mesh_run[0]):
        assert r["grad_keys_match"] and r["keys_match"] and r["grads_compared"] > 20, r
        assert r["grad_diff"] < tol * max(1.0, r["grad_mag"]) and r["grad_mag"] > 1e-2, r
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"])) < tol, r
        assert all(n > 0.05 for n in r["norms"]), "clipping must act, so a wrong gradient scale shows"
        # clip_grad_norm_ returns a float32 norm: 1e-6 relative
        assert max(abs(a - b) / b for a, b in zip(r["norms"], r["ref_norms"])) < max(tol, 1e-6), r
        assert r["weight_diff"] < tol and r["moved"] > 1e-3, r
        if case == "tiny":
            assert r["out_diff"] < tol and r["out_mag"] > 0.05, r


def test_meta_init_on_the_2d_mesh_gives_the_cpu_build_bit_for_bit(mesh_run):
    for res in mesh_run[0]:
        r = res["composed"]
        assert r["mesh_2d"] and r["init_keys_match"] and r["init_diff"] == 0.0, r


def test_checkpoint_is_the_one_process_model_and_loads_strictly_in_one_process(mesh_run):
    results, out = mesh_run
    for r in (res["tiny"] for res in results):
        assert r["one_process_diff"] < 1e-12 and r["reload_diff"] < 1e-12 and r["probe_mag"] > 0.05, r
        assert r["file_expert_shape"][0] == 4, "every expert once, as in one process"
        assert r["opt_entries"] == r["ref_opt_entries"] and r["opt_diff"] < 1e-9 and r["opt_roundtrip"] == 0.0, r
    with safe_open(str(out / "mesh2d.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert len(keys) == len(set(keys)) and any(k.endswith("experts.gate_up_proj") for k in keys)


def test_layout_chooses_the_2d_mesh_only_for_ep_and_fsdp_with_replicas():
    assert Layout(world=4, expert_parallel=2, fsdp=True).mesh_2d
    assert not Layout(world=2, expert_parallel=2, fsdp=True).mesh_2d  # no replicas: the 1-D layout
    assert not Layout(world=4, expert_parallel=2, fsdp=False).mesh_2d  # DDP + EP keeps replicated experts
    assert not Layout(world=4, expert_parallel=1, fsdp=True).mesh_2d


def test_shapes_that_cannot_be_laid_out_are_named():
    spec = {"backbone": {"params": {"moe": {"params": {"num_experts": 8}}}}}
    with pytest.raises(AudioMoEError, match="world size 6 is not a multiple of distributed.expert_parallel=4"):
        plan_layout(DistributedSpec(expert_parallel=4, fsdp=True), spec, 6)
    with pytest.raises(AudioMoEError, match="expert_parallel=3 does not divide backbone.moe.num_experts=8"):
        plan_layout(DistributedSpec(expert_parallel=3, fsdp=True), spec, 6)
    assert plan_layout(DistributedSpec(expert_parallel=2, fsdp=True), spec, 4).mesh_2d
    with pytest.raises(AudioMoEError, match="needs torch.distributed"):
        device_mesh_2d(2)


@pytest.mark.slow
def test_recipe_on_four_processes_ep2_fsdp_equals_one_process_and_resumes(tmp_path):
    """``audiomoe train --nproc 4`` with ``expert_parallel: 2, fsdp: true`` (the 2-D mesh) vs one process (1e-5), and a
    mid-stage resume at that layout (meta init reads this rank's rows of the checkpoint) ending bit-identical."""
    import test_train_distributed as T  # a sibling test module (pytest puts tests/train on sys.path)
    import yaml
    from safetensors.torch import load_file

    from audiomoe.train.recipe import load_recipe
    from audiomoe.train.trainer import RunOptions, run_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**T.RECIPE, "distributed": {"expert_parallel": 2, "fsdp": True}}))
    run_recipe(
        load_recipe(str(recipe), ["distributed.expert_parallel=1", "distributed.fsdp=false"]),
        RunOptions(out_dir=str(tmp_path / "one"), progress=False, device="cpu"),
    )
    common = ("--nproc", str(NPROC), "--device", "cpu", "--quiet")
    T._audiomoe("train", str(recipe), "--out", str(tmp_path / "mesh"), *common)
    a, b = T._losses(tmp_path / "one"), T._losses(tmp_path / "mesh")
    assert len(a) == len(b) == T.STEPS and max(abs(x - y) for x, y in zip(a, b)) < T.TOL, (a, b)
    for s in (2, T.STEPS):
        assert T._max_diff(T._weights(tmp_path / "one", s), T._weights(tmp_path / "mesh", s)) < T.TOL
    summary = json.loads((tmp_path / "mesh" / "summary.json").read_text())
    assert summary["layout"]["world"] == NPROC and summary["layout"]["data_parallel"] == 2
    out = tmp_path / "resumed"
    T._as_killed_after(tmp_path / "mesh", out, 3)
    T._audiomoe("train", "--resume", str(out), *common)
    x, y = load_file(str(tmp_path / "mesh" / "step-000004" / "model.safetensors")), T._weights(out, T.STEPS)
    assert x.keys() == y.keys() and max(float((x[k] - y[k]).abs().max()) for k in x) == 0.0
