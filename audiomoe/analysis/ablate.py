"""An ablation end to end: plan -> runs (resumable, failures reported) -> results tables -> claims -> report.

:func:`run_ablation` is what ``audiomoe ablate`` and ``audiomoe demo`` call. It writes ``plan.json``
(configs, seeds, baselines, skipped arms) into the study directory, so ``audiomoe report STUDY_DIR``
can redo the tables and plots later without training anything.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TextIO

from audiomoe.analysis.grid import Config, Plan
from audiomoe.analysis.results import collect, read_json, run_metrics
from audiomoe.core.atomic import write_text
from audiomoe.core.errors import AudioMoEError, did_you_mean

PLAN_FILE = "plan.json"


def save_plan(plan: Plan, root: Path, meta: dict[str, Any]) -> Path:
    """Write the plan (and the study's title, description, claims) as ``root/plan.json``."""
    root.mkdir(parents=True, exist_ok=True)
    data = {
        "configs": [asdict(c) for c in plan.configs],
        "seeds": plan.seeds,
        "baselines": plan.baselines,
        "skipped": plan.skipped,
        "metric": plan.metric,
        "measure_batches": plan.measure_batches,
        "skipped_configs": plan.skipped_configs,
        "arm_seeds": plan.arm_seeds,
        "task_groups": plan.task_groups,
        "config_seeds": plan.config_seeds,
        **meta,
    }
    path = root / PLAN_FILE
    write_text(path, json.dumps(data, indent=1, default=str), what="study plan")
    return path


def load_plan(root: Path) -> tuple[Plan, dict[str, Any]]:
    """Read ``root/plan.json`` back: the plan and its meta (title, description, claims)."""
    data = read_json(root / PLAN_FILE)
    if data is None:
        raise AudioMoEError(
            f"'{root}' has no {PLAN_FILE}: it is not a study directory written by audiomoe ablate / demo"
        )
    check_plan(data, root / PLAN_FILE)
    configs = []
    for c in data["configs"]:
        c = dict(c)
        for key in ("overrides", "labels", "train"):
            c[key] = tuple(tuple(x) if isinstance(x, list) else x for x in c.get(key, ()))
        configs.append(Config(**c))
    plan = Plan(
        configs,
        data["seeds"],
        data["baselines"],
        data["skipped"],
        data["metric"],
        data["measure_batches"],
        data.get("skipped_configs", {}),
        data.get("arm_seeds", {}),
        data.get("task_groups", {}),
        data.get("config_seeds", {}),
    )
    meta = {k: v for k, v in data.items() if k in ("title", "description", "claims", "seconds")}
    return plan, meta


#: plan.json's keys, their types and how a message names them; a config's own keys are Config's fields.
_PLAN_KEYS = {
    "configs": (list, "a list"),
    "seeds": (list, "a list"),
    "baselines": (dict, "an object"),
    "skipped": (dict, "an object"),
    "metric": (str, "a string"),
    "measure_batches": (int, "an integer"),
}


def check_plan(data: Any, path: Path) -> None:
    """Refuse a plan file with missing or mistyped keys before any work, naming the file and the key."""
    from dataclasses import fields

    redo = "write it again with `audiomoe ablate` (finished runs are kept)"
    if not isinstance(data, dict):
        raise AudioMoEError(f"{path}: not a study plan (a JSON object); {redo}")
    for key, (typ, name) in _PLAN_KEYS.items():
        if not isinstance(data.get(key), typ) or isinstance(data.get(key), bool):
            got = "missing" if key not in data else f"a {type(data[key]).__name__}"
            raise AudioMoEError(f"{path}: key '{key}' must be {name}, it is {got}; {redo}")
    known = {f.name for f in fields(Config)}
    for i, c in enumerate(data["configs"]):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("target"), str):
            raise AudioMoEError(f"{path}: configs[{i}] needs a string 'name' and 'target'; {redo}")
        if set(c) - known:
            raise AudioMoEError(f"{path}: configs[{i}] has unknown key(s) {sorted(set(c) - known)}; {redo}")


def _progress(total: int, metric: str, stream: TextIO) -> Any:
    state = {"n": 0}

    def done(run: Any, out: dict[str, Any]) -> None:
        state["n"] += 1
        head = f"[{state['n']}/{total}] {run.config.name} seed {run.seed}:"
        if out.get("status") != "ok":
            print(
                f"{head} FAILED in {out.get('stage')} (exit {out.get('returncode', '?')}): {out.get('error', '')[:200]}  -> {run.path}",
                file=stream,
                flush=True,
            )
            return
        summary = read_json(run.path / "train" / "summary.json") or {}
        held = (summary.get("heldout") or {}).get(
            "metrics"
        )  # the whole split, as the tables; else the last eval batches
        value = (held or run_metrics(summary)).get(metric)
        secs = out.get("wall_seconds")
        where = (
            "already finished"
            if out.get("skipped")
            else f"{secs:.1f} s"
            if isinstance(secs, (int, float))
            else "measured now"
        )
        shown = f"{metric} {value:.3f}" if isinstance(value, float) else f"{metric} n/a"
        print(f"{head} ok, {where}, {shown}", file=stream, flush=True)

    return done


def _check_metric(metric: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a key metric no finished run has (a typo would give an empty study), naming the ones they have."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok or any(isinstance(r.get(metric), (int, float)) for r in ok):
        return
    known = sorted(
        {k for r in ok for k, v in r.items() if isinstance(v, (int, float)) and ("/" in k or k == "final_loss")}
    )
    raise AudioMoEError(
        f"--metric {metric!r} is in no run's results.{did_you_mean(metric, known)} They have: {', '.join(known)}; "
        "the runs are kept: the same command with another --metric reports them without training"
    )


def run_ablation(
    plan: Plan,
    root: str | Path,
    *,
    title: str,
    description: str = "",
    claims: Sequence[Any] = (),
    jobs: int = 1,
    launcher: str = "local",
    timeout: Optional[float] = None,
    submitit_cluster: Optional[str] = None,
    submitit_options: Optional[dict] = None,
    stream: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Run ``plan`` under ``root`` (finished runs skipped), then write the tables and the report; returns paths and counts."""
    from audiomoe.analysis.claims import evaluate_claims
    from audiomoe.analysis.launch import check_runs, launch, run_state
    from audiomoe.analysis.report import study_report

    root = Path(root)
    runs = plan.runs(root)
    check_runs([r for r in runs if run_state(r) in ("todo", "stale")])  # a bad grid key fails here, not in each run
    claim_dicts = [c.model_dump() if hasattr(c, "model_dump") else dict(c) for c in claims]
    save_plan(plan, root, {"title": title, "description": description, "claims": claim_dicts})
    for arm, why in plan.skipped.items():
        print(f"skipping '{arm}': {why}", file=stream, flush=True)
    states = [run_state(r) for r in runs]
    finished, stale = states.count("done"), states.count("stale")
    print(
        f"{len(runs)} runs ({len(plan.configs)} config{'s' * (len(plan.configs) != 1)} x {plan.seeds_text()}) in {root}; {finished} already finished, "
        f"{len(runs) - finished} to run with {jobs} job(s) ({launcher})",
        file=stream,
        flush=True,
    )
    if stale:
        print(
            f"{stale} of them were trained here with other settings (steps, --set or options): trained again with these",
            file=stream,
            flush=True,
        )
    t0 = time.perf_counter()
    outcomes = launch(
        runs,
        jobs=jobs,
        launcher=launcher,
        batches=plan.measure_batches,
        timeout=timeout,
        done=_progress(len(runs), plan.metric, stream),
        submitit_cluster=submitit_cluster,
        submitit_options=submitit_options,
    )
    seconds = time.perf_counter() - t0
    collected = collect(runs, plan.baselines, root, groups=plan.task_groups)
    _check_metric(plan.metric, collected["rows"])
    claim_objs = [_Claim(**c) for c in claim_dicts]
    verdicts = evaluate_claims(claim_objs, collected["rows"], plan.metric, plan.arm_of(), plan.skipped)
    write_claims(root, verdicts)
    md, page = study_report(root, title, description, plan, collected, verdicts, seconds, ran=len(runs) - finished)
    failed = [o for o in outcomes if o.get("status") != "ok"]
    return {
        "root": root,
        "report_md": md,
        "report_html": page,
        "runs": len(runs),
        "failed": len(failed),
        "seconds": seconds,
        "claims": verdicts,
        "collected": collected,
    }


def rerender(root: str | Path) -> dict[str, Any]:
    """Redo the tables, claims and report of a study directory from its runs (nothing is trained)."""
    from audiomoe.analysis.claims import evaluate_claims
    from audiomoe.analysis.report import study_report

    root = Path(root)
    plan, meta = load_plan(root)
    runs = plan.runs(root)
    collected = collect(runs, plan.baselines, root, groups=plan.task_groups)
    claims = [_Claim(**c) for c in meta.get("claims", [])]
    verdicts = evaluate_claims(claims, collected["rows"], plan.metric, plan.arm_of(), plan.skipped)
    write_claims(root, verdicts)
    md, page = study_report(root, meta.get("title", "ablation"), meta.get("description", ""), plan, collected, verdicts)
    return {"root": root, "report_md": md, "report_html": page, "claims": verdicts, "collected": collected}


def write_claims(root: Path, verdicts: Sequence[dict[str, Any]]) -> None:
    """``claims.json`` (claim, arms, metric, difference, interval, p, verdict, minimum detectable effect) and
    ``controls.json`` (control, difference, interval, resolved)."""
    from audiomoe.analysis.claims import claims_files

    claims, controls = claims_files(verdicts)
    write_text(root / "claims.json", json.dumps(claims, indent=1, default=str), what="claims")
    write_text(root / "controls.json", json.dumps(controls, indent=1, default=str), what="controls")


def _Claim(**kw: Any) -> Any:
    from audiomoe.analysis.study import ClaimSpec

    return ClaimSpec(**kw)


def print_claims(verdicts: Sequence[dict[str, Any]], stream: TextIO = sys.stdout) -> None:
    """The claims table as plain text."""
    for c in sorted(verdicts, key=lambda v: v.get("role") != "control"):  # controls first: they gate the claims
        if c.get("role") == "control":
            state = "RESOLVED" if c.get("resolved") else "NOT RESOLVED"
            print(f"  (control {c['id']}) {c['claim']}\n      -> {state}: {c['plain']}", file=stream)
        else:
            print(f"  ({c['id']}) {c['claim']}\n      -> {c['verdict'].upper()}: {c['plain']}", file=stream)
        if c.get("differences"):
            print(f"         {c['differences']}", file=stream)
