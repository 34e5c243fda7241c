"""Running an ablation's runs: each one ``python -m audiomoe.cli train ... --out RUN/train``, then the measurement.

Every run is a real subprocess, so a crash (or an out-of-memory kill) in one never takes down the
others. :func:`execute_run` does one run: training unless ``RUN/train/summary.json`` exists (a
finished run is skipped; an unfinished one, e.g. of a killed sweep, starts over with ``--overwrite``),
then ``python -m audiomoe.analysis.measure RUN`` unless ``RUN/measure.json`` exists. Output goes to
``train.log`` / ``measure.log``; a failure writes ``failed.json`` (stage, exit code, the log's tail).

Launchers (:func:`launch`): ``local``, a pool of ``jobs`` workers on this machine (each run gets
``cpus // jobs`` threads); ``submitit``, each run a job through submitit (SLURM where ``sbatch`` is
found, else submitit's local executor; ``cluster="local"`` forces the latter, as the tests do), at most
``jobs`` in flight. The job function is :func:`execute_run` itself, so a job runs the same subprocesses.
Before the first run, :func:`check_runs` checks every config's command line as ``audiomoe train`` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from audiomoe.analysis.grid import Run
from audiomoe.analysis.measure import MEASURE_FILE
from audiomoe.analysis.results import FAILED_FILE, OUTCOME_FILE, read_json
from audiomoe.core.atomic import write_text
from audiomoe.core.errors import AudioMoEError

TAIL_LINES = 40
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def train_command(run: Run, python: str = sys.executable) -> list[str]:
    """The ``audiomoe train`` command line of ``run`` (``--overwrite`` when an unfinished run is in the way)."""
    c = run.config
    cmd = [python, "-m", "audiomoe.cli", "train", c.target]
    for o in c.overrides:
        cmd += ["--set", o]
    if not any(o.split("=", 1)[0].strip() == "seed" for o in c.overrides):  # a config that pins its init keeps it
        cmd += ["--set", f"seed={run.seed}"]  # the study's seed sets the initial weights (the spec's seed) ...
    cmd += ["--seed", str(run.seed), "--out", str(run.path / "train")]  # ... and what the run draws
    if c.steps is not None:
        cmd += ["--steps", str(c.steps), "--log-every", str(max(1, c.steps // 25))]
    for k, v in c.train:
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    if (run.path / "train").exists():
        cmd.append("--overwrite")
    return cmd


def check_runs(runs: Sequence[Run]) -> None:
    """Refuse a study whose configs would fail before training, before its first run starts (nothing is trained).

    Each config's ``audiomoe train`` command line (one seed stands for all) is checked as the command checks
    itself (:func:`audiomoe.train.cli.check_command`: options, recipe, the model composed on the meta device,
    its layout on ``--nproc`` processes, the data); the error names the config and the bad key or value.
    """
    from audiomoe.train.cli import check_command

    first: dict[str, Run] = {}
    for r in runs:
        first.setdefault(r.config.name, r)
    failed: dict[str, str] = {}
    for run in first.values():
        try:
            check_command(run_settings(run))
        except AudioMoEError as exc:
            failed[run.config.name] = str(exc).rstrip(". ")
    if failed:
        (name, why), more = next(iter(failed.items())), list(failed)[1:]
        names = ", ".join(more[:5]) + (", ..." if len(more) > 5 else "")
        also = f" (so do {len(more)} other config(s): {names})" if more else ""
        raise AudioMoEError(
            f"config '{name}' cannot train: {why}{also}. Nothing was trained; fix the --grid / "
            "--variant / --set / --train value (or the study file) and run again"
        )


def measure_command(run: Run, batches: int, python: str = sys.executable) -> list[str]:
    """The measurement command line of ``run``."""
    return [python, "-m", "audiomoe.analysis.measure", str(run.path), "--batches", str(batches)]


#: the training settings of a run (its command line, less the interpreter and --overwrite), written when it is trained
SETTINGS_FILE = "settings.json"


def run_settings(run: Run) -> list[str]:
    """What makes a run this run: its ``audiomoe train`` arguments (the plan's target, overrides, seed, steps, options)."""
    return [a for a in train_command(run)[3:] if a != "--overwrite"]


def run_state(run: Run) -> str:
    """``done`` (trained and measured), ``trained`` (measurement missing, of an older version or checkpoint), ``stale``
    (trained with other settings: another --steps, --set or option into the same directory) or ``todo``."""
    if not (run.path / "train" / "summary.json").is_file():
        return "todo"
    recorded = read_json(run.path / SETTINGS_FILE)
    if recorded is not None and recorded != run_settings(run):
        return "stale"
    from audiomoe.analysis.measure import measure_is_current

    summary = read_json(run.path / "train" / "summary.json") or {}
    return "done" if measure_is_current(read_json(run.path / MEASURE_FILE), summary) else "trained"


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _step(cmd: list[str], log: Path, env: dict[str, str], timeout: Optional[float]) -> int:
    with open(log, "w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            return subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"\n[audiomoe ablate] killed after the run timeout of {timeout} s\n")
            return 124


def execute_run(run: Run, batches: int = 4, threads: int = 1, timeout: Optional[float] = None) -> dict[str, Any]:
    """Train (unless finished) and measure (unless measured) one run; returns and writes its outcome."""
    run.path.mkdir(parents=True, exist_ok=True)
    (run.path / FAILED_FILE).unlink(missing_ok=True)
    env = _env(threads)
    t0 = time.perf_counter()
    state = run_state(run)
    outcome: dict[str, Any] = {
        "config": run.config.name,
        "seed": run.seed,
        "path": str(run.path),
        "skipped": state == "done",
    }
    if state in ("todo", "stale"):  # the settings first: a run killed mid-training is still known as this run's
        write_text(run.path / SETTINGS_FILE, json.dumps(run_settings(run)), what="run settings")
    stages = [("train", train_command(run), run.path / "train.log")] if state in ("todo", "stale") else []
    if state != "done":
        stages.append(("measure", measure_command(run, batches), run.path / "measure.log"))
    for stage, cmd, log in stages:
        rc = _step(cmd, log, env, timeout)
        if rc != 0:
            tail = _tail(log)
            fail = {"stage": stage, "returncode": rc, "command": cmd, "stderr_tail": tail, "log": str(log)}
            write_text(run.path / FAILED_FILE, json.dumps(fail, indent=1), what="failure record")
            outcome.update(
                status="failed", stage=stage, returncode=rc, error=next((x for x in reversed(tail) if x.strip()), "")
            )
            break
    else:
        outcome["status"] = "ok"
    if state in ("todo", "stale"):
        outcome["retrained"] = state == "stale"
        outcome["wall_seconds"] = round(time.perf_counter() - t0, 2)
        write_text(run.path / OUTCOME_FILE, json.dumps(outcome, indent=1), what="run outcome")
    else:
        outcome["wall_seconds"] = (read_json(run.path / OUTCOME_FILE) or {}).get("wall_seconds")
    return outcome


def _local(
    runs: Sequence[Run], jobs: int, batches: int, timeout: Optional[float], done: Callable[[Run, dict], None]
) -> list[dict]:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results = []
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(execute_run, r, batches, threads, timeout): r for r in runs}
        for fut in as_completed(futures):
            run = futures[fut]
            try:
                out = fut.result()
            except OSError as exc:  # the run directory itself is unusable (disk full, permissions): report, go on
                out = {
                    "config": run.config.name,
                    "seed": run.seed,
                    "path": str(run.path),
                    "status": "failed",
                    "stage": "setup",
                    "error": str(exc),
                }
            results.append(out)
            done(run, out)
    except KeyboardInterrupt:  # Ctrl-C reaches the running children too; start no further runs
        pool.shutdown(wait=False, cancel_futures=True)
        raise KeyboardInterrupt(
            "ablation interrupted; rerun the same command to continue (finished runs are kept)"
        ) from None
    pool.shutdown(wait=True)
    return results


def _submitit(
    runs: Sequence[Run],
    jobs: int,
    batches: int,
    timeout: Optional[float],
    done: Callable[[Run, dict], None],
    folder: Path,
    cluster: Optional[str],
    options: Mapping[str, Any],
) -> list[dict]:
    try:
        import submitit
    except ImportError:
        raise AudioMoEError(
            "--launcher submitit needs the submitit package: pip install 'audiomoe[slurm]' (or pip install submitit)"
        ) from None
    if cluster == "local":
        executor: Any = submitit.LocalExecutor(folder=str(folder))
    else:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {"timeout_min": max(1, int((timeout or 3600 * 4) // 60))}
    params.update(options)
    try:
        executor.update_parameters(**params)
    except Exception as exc:  # noqa: BLE001 - submitit raises ValueError / TypeError on unknown parameters
        raise AudioMoEError(f"submitit does not accept the options {dict(options)}: {exc}") from None
    threads = int(options.get("cpus_per_task", 1)) if cluster != "local" else max(1, (os.cpu_count() or 1) // jobs)
    pending, flying, results = list(runs), [], []
    while pending or flying:
        while pending and len(flying) < jobs:
            r = pending.pop(0)
            flying.append((r, executor.submit(execute_run, r, batches, threads, timeout)))
        time.sleep(0.5)
        for item in [f for f in flying if f[1].done()]:
            flying.remove(item)
            r, job = item
            try:
                out = job.result()
            except Exception as exc:  # noqa: BLE001 - the job itself died (node failure, timeout): report it, go on
                text = " ".join(str(exc).split())[-300:]
                out = {
                    "config": r.config.name,
                    "seed": r.seed,
                    "path": str(r.path),
                    "status": "failed",
                    "stage": "job",
                    "error": text,
                }
                r.path.mkdir(parents=True, exist_ok=True)
                write_text(
                    r.path / FAILED_FILE,
                    json.dumps({"stage": "job", "stderr_tail": [text]}, indent=1),
                    what="failure record",
                )
            results.append(out)
            done(r, out)
    return results


def launch(
    runs: Sequence[Run],
    *,
    jobs: int = 1,
    launcher: str = "local",
    batches: int = 4,
    timeout: Optional[float] = None,
    done: Optional[Callable[[Run, dict], None]] = None,
    submitit_folder: Optional[str | Path] = None,
    submitit_cluster: Optional[str] = None,
    submitit_options: Optional[Mapping[str, Any]] = None,
) -> list[dict]:
    """Run every run (finished ones are skipped inside :func:`execute_run`); ``done(run, outcome)`` after each."""
    if jobs < 1:
        raise AudioMoEError(f"--jobs must be >= 1, got {jobs}")
    done = done or (lambda r, o: None)
    if launcher == "local":
        return _local(runs, jobs, batches, timeout, done)
    if launcher == "submitit":
        folder = Path(submitit_folder or (runs[0].path.parents[2] / "submitit" if runs else "submitit"))
        return _submitit(runs, jobs, batches, timeout, done, folder, submitit_cluster, submitit_options or {})
    raise AudioMoEError(f"unknown --launcher '{launcher}'; use local or submitit")
