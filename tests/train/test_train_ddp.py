"""DDP on PyTorch's own engine: a real 2-process gloo run on 127.0.0.1 (torchrun, then ``--nproc 2 --resume``)
matches a 1-process run with the same global batch, step by step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audiomoe.train import TrainConfig, load_trainer_state, train
from audiomoe.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
# a constant lr: the 3-step run resumed to 5 must match a 5-step run, which a decaying schedule would not allow
ARGS = [
    "tiny-cls",
    "--data",
    "tones",
    "--batch-size",
    "8",
    "--eval-batches",
    "0",
    "--device",
    "cpu",
    "--quiet",
    "--schedule",
    "constant",
]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_gloo_processes_match_one_process_and_resume(tmp_path):
    one = tmp_path / "one"
    train(
        "tiny-cls",
        [],
        TrainConfig(
            steps=5,
            batch_size=8,
            eval_batches=0,
            data="tones",
            out_dir=str(one),
            progress=False,
            logs=True,
            device="cpu",
            schedule="constant",
        ),
    )
    two = tmp_path / "two"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--nnodes=1",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "audiomoe",
        "train",
        *ARGS,
        "--steps",
        "3",
        "--out",
        str(two),
    ]
    res = subprocess.run(torchrun, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    state = load_trainer_state(two)
    assert (
        state["extra"]["world"] == 2 and tuple(state["extra"]["rng_ranks"].shape)[0] == 2
    )  # every rank's RNG is saved
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    # resume the 2-process run through `--nproc 2` (torchrun's launcher started by audiomoe itself)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "audiomoe",
            "train",
            *ARGS,
            "--steps",
            "5",
            "--out",
            str(two),
            "--resume",
            "--nproc",
            "2",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 5
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    w1, w2 = (
        load_file(str(one / "step-000005" / "model.safetensors")),
        load_file(str(two / "step-000005" / "model.safetensors")),
    )
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


@pytest.mark.slow
def test_two_processes_on_the_corpus_read_disjoint_shards_of_an_moe_model(tmp_path):
    """2 ranks, a top-p MoE (unused experts per rank: find_unused_parameters), the corpus loader's rank shards."""
    from audiomoe.data import make_corpus

    make_corpus(tmp_path / "corpus", "tiny", 0, progress=False)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "audiomoe",
        "train",
        "unimoe-naive-tiny",
        "--set",
        "stages.foundation.steps=2",
        "--set",
        "stages.joint.steps=3",
        "--set",
        "eval.batches=1",
        "--data",
        str(tmp_path / "corpus" / "manifest.jsonl"),
        "--out",
        str(out),
        "--nproc",
        "2",
        "--device",
        "cpu",
        "--quiet",
    ]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    state = load_trainer_state(out)
    pos = state["extra"]["data_ranks"]
    assert tuple(pos.shape) == (2, 3) and pos[:, 1].tolist() == [3, 3]  # each rank consumed 3 batches of its own shard
    from audiomoe.data.sampling import BucketBatchSampler

    durations = [1.0] * 40
    shards = [
        BucketBatchSampler(durations, [0] * 40, [1.0], max_seconds=4, rank=r, world_size=2, seed=0) for r in range(2)
    ]
    items = [{i for b in s.epoch_batches(0) for i, _ in b} for s in shards]
    assert not items[0] & items[1] and len(items[0] | items[1]) == 40
