"""Kill test: ``kill -9`` at random moments of `audiomoe train` runs that checkpoint every step.

After every kill, ``latest`` must name a complete checkpoint that loads (model and trainer state),
and the next ``--resume`` must continue from it. The 20-kill test forks its runs from a process
that has imported torch once (each child runs the real ``audiomoe.cli.main(["train", ...])``), so
20 kills fit in seconds; one more test kills the installed console script itself (and a slow
one does all 20 kills that way).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audiomoe.train import TrainConfig, load_checkpoint, load_trainer_state, train
from audiomoe.train.checkpoint import read_latest

from helpers.forkserver import server_source

_HERE = Path(sys.executable).parent / "audiomoe"
EXE = [str(_HERE)] if _HERE.exists() else [sys.executable, "-m", "audiomoe.cli"]

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: threads only contend with other tests
TRAIN = [
    "tiny-cls",
    "--steps",
    "1000000",
    "--save-every",
    "1",
    "--batch-size",
    "2",
    "--eval-batches",
    "0",
    "--keep",
    "2",
    "--quiet",
]

# Reads one argv per line, forks a child that runs cli.main(argv), prints its pid, then how it ended.
SERVER = server_source(
    """
    import torch, torch._dynamo, torch.optim  # imported once; no tensor op runs before fork
    import audiomoe.train
    """
)


def _check_latest(out: Path) -> int:
    """``latest`` names a complete checkpoint: the model and the trainer state load. Returns its step."""
    ckpt = read_latest(out)
    assert ckpt is not None and ckpt.parent == out, sorted(p.name for p in out.iterdir())
    load_checkpoint(out)
    state = load_trainer_state(out)
    assert state["step"] == int(ckpt.name.split("-")[1])
    return state["step"]


def _wait_for_step(out: Path, after: int, timeout: float = 30.0) -> None:
    """Wait until ``latest`` names a step beyond ``after`` (the run is training and saving)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            name = (out / "latest").read_text().strip()
            if int(name.split("-")[1]) > after:
                return
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint after step {after} within {timeout} s")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_twenty_random_kill_9_leave_latest_on_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    rng = random.Random(1234)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        assert server.stdout.readline().strip() == "ready"
        step, kills = 0, 0
        for i in range(20):
            resume = ["--resume"] if i else []
            server.stdin.write(" ".join(["train", *TRAIN, "--out", str(out), *resume]) + "\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            if i % 4 == 0:  # some kills wait for a fresh checkpoint, the others land anywhere (start-up too)
                _wait_for_step(out, step)
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(pid, signal.SIGKILL)
            status = server.stdout.readline().split()
            assert status[0] == "status"
            kills += os.WIFSIGNALED(int(status[1]))
            if (out / "latest").exists() or step:
                new = _check_latest(out)
                assert new >= step  # never back to an older checkpoint
                step = new
        assert kills == 20 and step > 0
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    # the next save cleans what the kills left behind (temp directories of dead writers)
    train(
        None,
        (),
        TrainConfig(
            steps=_check_latest(out) + 1, batch_size=2, eval_batches=0, out_dir=str(out), resume=True, progress=False
        ),
    )
    assert not [p.name for p in out.iterdir() if p.name.startswith((".step-", ".old-", ".del-", ".latest."))]
    assert len([p for p in out.glob("step-*")]) == 2


def _kill_console_script(out: Path, step: int, rng: random.Random, wait: bool, resume: bool) -> int:
    """Start the installed `audiomoe train`, kill -9 it at a random moment, check the run; return its step."""
    proc = subprocess.Popen(EXE + ["train", *TRAIN, "--out", str(out), *(["--resume"] if resume else [])], env=ENV)
    try:
        if wait:
            _wait_for_step(out, step)
        time.sleep(rng.uniform(0.0, 1.5 if not wait else 0.2))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if (out / "latest").exists() or step:
        new = _check_latest(out)
        assert new >= step
        return new
    return step


def test_kill_9_of_the_installed_console_script(tmp_path):
    step = _kill_console_script(tmp_path / "run", 0, random.Random(7), wait=True, resume=False)
    assert step > 0 and not (tmp_path / "run" / "summary.json").exists()  # it really died mid-run


@pytest.mark.slow
def test_twenty_kill_9_of_the_console_script(tmp_path):
    """The same 20 kills, each on a fresh `audiomoe train` console-script process (about a minute)."""
    out, rng, step = tmp_path / "run", random.Random(99), 0
    for i in range(20):
        step = _kill_console_script(out, step, rng, wait=i % 2 == 0, resume=i > 0)
    assert step > 0
