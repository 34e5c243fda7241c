"""Real sweeps: ``audiomoe ablate`` as a user runs it, every run a real ``audiomoe train`` subprocess.

The fast test trains one tiny run and fails another; the slow ones run the 2 x 2 grid x 2 seeds (killed
half-way and resumed), the submitit launcher (its local executor) and ``audiomoe report`` on one run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--steps",
    "2",
    "--train",
    "batch_size=4",
    "--train",
    "eval_batches=1",
    "--train",
    "eval_every=2",
    "--measure-batches",
    "1",
]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("AUDIOMOE_DEBUG", None)
    return env


def ablate(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "audiomoe.cli", "ablate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=ROOT,
    )


def _csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path


def test_a_failed_run_is_reported_and_the_others_finish(tmp_path):
    out = tmp_path / "study"
    # a config that composes (ablate checks each before the first run) but whose data fails in training
    (tmp_path / "lost.jsonl").write_text('{"audio": "lost.wav", "task": "emotion", "target": "x"}\n')
    bad = f"bad=data={tmp_path / 'lost.jsonl'}"
    r = ablate(
        "tiny-moe-cls", "--variant", "good=", "--variant", bad, "--seeds", "1", "--jobs", "2", *TINY, "--out", str(out)
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "bad seed 0: FAILED in train" in r.stdout and "good seed 0: ok" in r.stdout
    assert "1 run(s) failed" in r.stderr
    failed = json.loads((out / "runs" / "bad" / "seed-0" / "failed.json").read_text())
    assert failed["stage"] == "train" and failed["returncode"] != 0
    last = failed["stderr_tail"][-1]  # the trainer's own message, not the command line
    assert "error" in last and "lost.wav" in last and not last.startswith("$"), failed["stderr_tail"]
    rows = {r["config"]: r for r in _csv(out / "results.csv")}
    assert rows["good"]["status"] == "ok" and rows["bad"]["status"] == "failed"
    assert float(rows["good"]["params_total"]) > 0 and float(rows["good"]["moe_mflops_per_audio_s"]) > 0
    assert 0.0 <= float(rows["good"]["mean/accuracy"]) <= 1.0
    page = (out / "report.html").read_text()
    assert "Failed or unfinished runs" in page and "data:image/png;base64," in page
    assert (out / "runs" / "good" / "seed-0" / "measure.json").is_file()
    # a misspelled key metric is refused, naming the right one; the finished run is kept (not trained again)
    r = ablate("tiny-moe-cls", "--variant", "good=", "--seeds", "1", *TINY, "--metric", "mean/acc", "--out", str(out))
    assert r.returncode == 2 and "'mean/acc' is in no run's results. Did you mean 'mean/accuracy'?" in r.stderr, (
        r.stderr
    )
    assert "1 already finished, 0 to run" in r.stdout


def _finished(out: Path) -> list[Path]:
    return sorted(out.glob("runs/*/seed-*/train/summary.json"))


@pytest.mark.slow
def test_grid_2x2_x_2_seeds_killed_then_resumed_reruns_only_unfinished_runs(tmp_path):
    out = tmp_path / "grid"
    args = [
        "tiny-moe-cls",
        "--grid",
        "backbone.moe.router=top_k,top_p",
        "--grid",
        "backbone.moe.num_experts=2,4",
        "--seeds",
        "2",
        *TINY,
        "--out",
        str(out),
    ]
    cmd = [sys.executable, "-m", "audiomoe.cli", "ablate", *args, "--jobs", "1"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, start_new_session=True
    )
    deadline = time.time() + 400
    while len(_finished(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole sweep, its running training run included
    proc.wait()
    before = {p: p.stat().st_mtime_ns for p in _finished(out)}
    assert 2 <= len(before) < 8
    r = ablate(*args, "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        f"{len(before)} already finished" in r.stdout or f"{len(before) - 1} already finished" in r.stdout
    )  # one may lack its measurement
    for p, mtime in before.items():  # finished runs were not trained again
        assert p.stat().st_mtime_ns == mtime, p
    assert len(_finished(out)) == 8
    rows = _csv(out / "results.csv")
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert sorted((r["grid/router"], r["grid/num_experts"], r["seed"]) for r in rows) == sorted(
        (a, b, s) for a in ("top_k", "top_p") for b in ("2", "4") for s in ("0", "1")
    )
    agg = _csv(out / "aggregate.csv")
    assert [a["config"] for a in agg] == [
        "router=top_k+num_experts=2",
        "router=top_k+num_experts=4",
        "router=top_p+num_experts=2",
        "router=top_p+num_experts=4",
    ]
    assert all(a["ok"] == "2" and a["mean/accuracy/n"] == "2" for a in agg)
    comps = _csv(out / "comparisons.csv")
    assert {c["config"] for c in comps} == {a["config"] for a in agg[1:]} and {c["baseline"] for c in comps} == {
        agg[0]["config"]
    }
    assert len([json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]) == 8
    for name in ("metric", "moe_flops", "experts_per_layer", "expert_load", "training_curves"):
        _png_ok(out / "plots" / f"{name}.png")
    md = (out / "report.md").read_text()
    assert "## Results per config" in md and "router=top_p+num_experts=4" in md and "](plots/metric.png)" in md
    assert (
        "8 of 8 runs finished; this invocation ran " in md and "the others were already done" in md
    )  # not the study's time


@pytest.mark.slow
def test_submitit_local_executor_runs_each_run_as_a_job(tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "sub"
    r = ablate(
        "tiny-moe-cls",
        "--grid",
        "backbone.moe.router=top_k,top_p",
        "--seeds",
        "1",
        *TINY,
        "--jobs",
        "2",
        "--launcher",
        "submitit",
        "--submitit-cluster",
        "local",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 2  # submitit's own job records
    assert {row["status"] for row in _csv(out / "results.csv")} == {"ok"}


@pytest.mark.slow
def test_report_of_one_run_from_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = _env()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "audiomoe.cli",
            "train",
            "tiny-unimoe",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--eval-batches",
            "1",
            "--eval-every",
            "2",
            "--out",
            str(run),
            "--quiet",
        ],
        check=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    r = subprocess.run(
        [sys.executable, "-m", "audiomoe.cli", "report", str(run), "--batches", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (run / "measure.json").is_file() and "report:" in r.stdout
    for name in ("experts_per_layer", "null_share", "expert_load"):
        _png_ok(run / "plots" / f"{name}.png")
    assert "Routing by task" in (run / "report.md").read_text()
