"""Exact resume of a two-stage recipe: ``kill -9`` at random moments (also mid-checkpoint), resume, and
end with weights (and a log) bit-identical to an uninterrupted run. Pickle-free: no torch.load anywhere."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from audiomoe.train.recipe import load_recipe
from audiomoe.train.rundir import holds_run
from audiomoe.train.trainer import RunOptions, run_recipe

from helpers.forkserver import server_source

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
RECIPE = {
    "name": "kill-me",
    "data": "tones",
    "batch_size": 4,
    "model": {
        "preset": "tiny-unimoe",
        "overrides": ["backbone.moe.router.input_jitter=0.01"],
    },  # training draws from the RNG
    "optim": {"lr": 3e-3, "grad_clip": 1.0},
    "schedule": {"kind": "cosine", "warmup": 3},
    "eval": {"batches": 0},
    "log": {"routing_every": 5},
    "checkpoint": {"every": 1, "keep": 2},
    "stages": [
        {"name": "gates", "steps": 15, "train": ["router", "shared_experts"]},
        {"name": "joint", "steps": 25, "freeze": ["encoder"], "aux_weight": {"start": 0.025, "end": 0.001}},
    ],
}
# One argv per line; forks a child running cli.main(argv) (torch imported once), prints its pid, then its status.
SERVER = server_source(
    """
    import torch, torch.optim, safetensors.torch  # imported once; no tensor op runs before fork
    from torch.utils.tensorboard import SummaryWriter
    import audiomoe.train.steploop, audiomoe.backbones.unimoe_transformer, audiomoe.encoders.conv_frontend
    from audiomoe.core.registry import get_registry
    get_registry()  # plugins loaded once, in the parent
    """
)


def _losses(out: Path) -> list[tuple[int, float]]:
    return [
        (r["step"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r
    ]


def _step(out: Path) -> int:
    try:
        return int((out / "latest").read_text().strip().split("-")[1])
    except (OSError, ValueError, IndexError):
        return 0


def _wait_past(out: Path, step: int, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while _step(out) <= step and time.monotonic() - t0 < timeout:
        time.sleep(0.002)


def _wait_for_write(out: Path, pid: int, timeout: float = 30.0) -> None:
    """Return as soon as process ``pid`` has a checkpoint write in flight (its temp entry exists)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if _mid_write(out, pid):
                return
        except OSError:  # the run directory is not made yet
            pass
        time.sleep(0.0005)


def _mid_write(out: Path, pid: int) -> bool:
    """The kill landed inside a checkpoint write: a temp file of that writer is left behind."""
    if not out.is_dir():  # killed before the run directory existed (a slow start on a loaded machine)
        return False
    return any(
        f".{pid}." in p.name or p.name.endswith(f".{pid}")
        for p in out.iterdir()
        if p.name.startswith((".step-", ".old-", ".del-", ".latest."))
    )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("needed", [5, pytest.param(20, marks=pytest.mark.slow)])
def test_kill_9_at_random_moments_then_resume_ends_bit_identical(tmp_path, needed):
    k = needed // 5  # more kills need a longer run: 40 steps per 5 kills
    recipe = {**RECIPE, "stages": [{**RECIPE["stages"][0], "steps": 15 * k}, {**RECIPE["stages"][1], "steps": 25 * k}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    ref = tmp_path / "ref"
    run_recipe(load_recipe(str(path)), RunOptions(out_dir=str(ref), progress=False, device="cpu"))
    out, rng = tmp_path / "run", random.Random(2024)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=str(tmp_path),
    )
    kills, mid_write, finished = 0, 0, False
    try:
        assert server.stdout.readline().strip() == "ready"
        for i in range(10 * needed):
            resume = ["--resume"] if out.exists() and holds_run(out) else []
            server.stdin.write(
                " ".join(["train", str(path), "--out", str(out), "--quiet", "--device", "cpu", *resume]) + "\n"
            )
            server.stdin.flush()
            pid = int(server.stdout.readline())
            last = kills >= needed and mid_write >= 1
            if not last:
                if kills >= needed - 1 and mid_write == 0:  # no kill hit a checkpoint write yet: aim this one at one
                    _wait_for_write(out, pid)
                else:
                    if i % 3:  # most kills land while training and saving, some during start-up
                        _wait_past(out, _step(out))
                    time.sleep(rng.uniform(0.0, 0.25))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # it finished first (reaped by the server): its status says so
                    pass
            status = int(server.stdout.readline().split()[1])
            if last or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
                finished = True
                break
            assert os.WIFSIGNALED(status), status
            kills += 1
            mid_write += _mid_write(out, pid)
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    print(f"{kills} kills, {mid_write} inside a checkpoint write")
    assert finished and kills >= needed and mid_write >= 1, (kills, mid_write)
    a = load_file(str(ref / f"step-{40 * k:06d}" / "model.safetensors"))
    b = load_file(str(out / f"step-{40 * k:06d}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(out) == _losses(ref)  # every step logged once, with the loss of the unbroken run


def test_resume_loads_no_pickle(tmp_path, monkeypatch):
    recipe = load_recipe(
        {**RECIPE, "stages": [{"name": "a", "steps": 2}, {"name": "b", "steps": 2, "freeze": ["encoder"]}]}
    )
    run_recipe(recipe, RunOptions(out_dir=str(tmp_path / "r"), progress=False, device="cpu"))

    def no_pickle(*a, **k):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    longer = load_recipe(
        {**RECIPE, "stages": [{"name": "a", "steps": 2}, {"name": "b", "steps": 3, "freeze": ["encoder"]}]}
    )
    res = run_recipe(longer, RunOptions(out_dir=str(tmp_path / "r"), resume=True, progress=False, device="cpu"))
    assert res["start_step"] == 4 and res["steps"] == 5
    assert not list((tmp_path / "r").rglob("*.pt")) and not list((tmp_path / "r").rglob("*.pkl"))
