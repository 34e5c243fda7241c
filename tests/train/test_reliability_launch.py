"""Under ``train --nproc`` a user error is one clear line, once; ``ablate`` checks every config before its first run.

A configuration error (options, recipe, model overrides, the ``distributed:`` layout against the number
of experts and processes, the global batch) is refused before torchrun starts a process; an error that
only a rank can meet (its run directory, its data) is printed once, by the launcher, with the CLI's exit
code and without torchrun's traceback (real 2-process gloo launches on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from audiomoe import cli
from audiomoe.train import distributed
from audiomoe.train.failures import FAILURE_DIR_ENV, failure_report, write_agent_report, write_failure

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
if Path("/sys/class/net/lo").exists():
    ENV.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on the loopback device
OPTS = ["--steps", "2", "--eval-batches", "0", "--device", "cpu", "--quiet"]
TONES = ["--data", "tones", *OPTS]


@pytest.fixture
def no_launch(monkeypatch):
    """A tripwire on torchrun's launcher: a test using it fails if any process would be started."""
    started = []

    def tripwire(nproc, argv, env=None):
        started.append(list(argv))
        raise AssertionError(f"torchrun was started for {argv}")

    monkeypatch.setattr(distributed, "launch", tripwire)
    return started


@pytest.mark.parametrize(
    "args, says",
    [
        (["tiny-cls", "--batch-size", "3"], "batch_size 3 must be a multiple of the number of processes (2)"),
        (
            ["tiny-unimoe", "--batch-size", "4", "--expert-parallel", "3"],
            "expert_parallel=3 does not divide",
        ),  # 8 experts
        (["tiny-unimoe", "--batch-size", "4", "--expert-parallel", "4"], "world size 2 is not a multiple of"),
        (["tiny-cls", "--batch-size", "4", "--expert-parallel", "2"], "this model has no MoE layer"),
        (["tiny-moe-cls", "--batch-size", "4", "--set", "backbone.moe.routr=top_p"], "Did you mean 'router'?"),
        (["tiny-cls", "--batch-size", "4", "--data", "missing.jsonl"], "--data"),
    ],
)
def test_a_configuration_error_is_refused_before_any_process_starts(args, says, no_launch, tmp_path, capsys):
    opts = OPTS if "--data" in args else TONES
    rc = cli.main(["train", *args, *opts, "--nproc", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not no_launch
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("audiomoe train: error: ") and says in lines[0], err
    assert not (tmp_path / "run").exists()  # nothing written either


def _records(folder, monkeypatch, *records):
    folder.mkdir()
    monkeypatch.setenv(FAILURE_DIR_ENV, str(folder))
    for rank, code, line in records:
        monkeypatch.setenv("RANK", str(rank))
        assert write_failure(code, line)


def test_the_rank_that_failed_for_its_own_reason_is_reported(tmp_path, monkeypatch):
    # rank 1's configuration error, then rank 0 losing its peer in a collective
    _records(
        tmp_path / "a",
        monkeypatch,
        (1, 2, "audiomoe train: error: bad data"),
        (0, 1, "audiomoe train: unexpected error: gloo closed"),
    )
    assert failure_report(tmp_path / "a", "train", 1) == (2, "audiomoe train: error: bad data")
    # rank 0's own error outranks the others' "rank 0 failed", whichever was written first
    _records(
        tmp_path / "b",
        monkeypatch,
        (1, 2, "audiomoe train: error: rank 0 failed while x"),
        (0, 2, "audiomoe train: error: the real one"),
    )
    assert failure_report(tmp_path / "b", "train", 1) == (2, "audiomoe train: error: the real one")
    # two unexpected errors: the first written
    _records(
        tmp_path / "c",
        monkeypatch,
        (1, 1, "audiomoe train: unexpected error: first"),
        (0, 1, "audiomoe train: unexpected error: then"),
    )
    assert failure_report(tmp_path / "c", "train", 1)[1].endswith("first")


def test_a_rank_killed_without_a_message_is_named_with_its_signal(tmp_path, monkeypatch):
    monkeypatch.setenv(FAILURE_DIR_ENV, str(tmp_path))
    write_agent_report({"failures": {"1": -9, "0": -15}})
    code, line = failure_report(tmp_path, "train", 1)
    assert code == 1 and "rank 1 killed by SIGKILL" in line and "rank 0 killed by SIGTERM" in line and "\n" not in line
    assert json.loads((tmp_path / "agent.json").read_text())["failures"]["1"] == -9


def test_outside_a_launch_a_rank_prints_its_own_error(tmp_path, monkeypatch):
    monkeypatch.delenv(FAILURE_DIR_ENV, raising=False)
    assert not write_failure(2, "audiomoe train: error: x")


def _launch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "audiomoe", "train", "tiny-cls", "--batch-size", "2", *TONES, "--nproc", "2", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=str(cwd))


def _one_line(res: subprocess.CompletedProcess, says: str) -> None:
    err = res.stderr
    assert res.returncode == 2, err[-3000:]
    assert err.count("audiomoe train: error:") == 1 and says in err, err[-3000:]
    for noise in ("Traceback", "ChildFailedError", "torch.distributed.elastic", "SIGTERM"):
        assert noise not in err, err[-3000:]


@pytest.mark.slow
def test_an_error_only_rank_0_meets_is_printed_once_without_a_traceback(tmp_path):
    """Rank 0 opens the run directory (a file here); rank 1 only hears that rank 0 failed."""
    (tmp_path / "out").write_text("not a directory")
    res = _launch("--out", str(tmp_path / "out"), cwd=tmp_path)
    _one_line(res, "is a file, not a directory")


@pytest.mark.slow
def test_an_error_every_rank_meets_is_printed_once_without_a_traceback(tmp_path):
    """Every rank reads the manifest (the check before launch only sees that it exists) and refuses its audio file."""
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav", "task": "cls", "target": "x"}\n')
    res = _launch("--data", str(tmp_path / "m.jsonl"), cwd=tmp_path)
    _one_line(res, "m.jsonl:1: audio file")


def test_ablate_refuses_a_misspelled_grid_key_before_any_run(tmp_path, capsys):
    out = tmp_path / "study"
    grid = "backbone.moe.routr=top_k,top_p"
    rc = cli.main(["ablate", "tiny-moe-cls", "--grid", grid, "--seeds", "2", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "routr" in err and "Did you mean 'router'?" in err and "Nothing was trained" in err
    assert err.count("\n") == 1  # one line
    assert not (out / "runs").exists() and not (out / "plan.json").exists()


@pytest.mark.parametrize(
    "grid, train, says",
    [
        ("backbone.moe.router.k=1,99", [], "config 'k=99' cannot train: router k=99"),
        (
            "backbone.moe.num_experts=4,5",
            ["--train", "nproc=2", "--train", "expert_parallel=2"],
            "'num_experts=5' cannot",
        ),
        ("backbone.moe.router=top_k,nope", [], "unknown router 'nope'"),
    ],
)
def test_ablate_refuses_a_bad_grid_value_before_any_run(grid, train, says, tmp_path, capsys):
    out = tmp_path / "study"
    rc = cli.main(["ablate", "tiny-moe-cls", "--grid", grid, *train, "--seeds", "1", "--steps", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and says in err, err
    assert not (out / "runs").exists()
