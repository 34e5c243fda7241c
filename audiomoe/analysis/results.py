"""Collect a study's run directories into rows; write ``results.csv/jsonl``, ``aggregate.*`` and ``comparisons.*``.

One row per run: config, arm, seed, status (``ok`` / ``failed`` / ``missing``), the eval metrics of
``summary.json`` (``eval_after``: ``<task>/<metric>``) plus ``mean/<metric>`` (mean over tasks) and
``worst/<metric>`` (the weakest task), final loss, training and wall seconds, total and measured
active parameters, MoE MFLOPs per audio second, and routing health averaged over MoE layers
(``real_experts_per_token``, ``null_share``). Then one aggregate row per config (mean, std, 95% CI
over seeds) and one comparison row per (config, metric) against the arm's baseline (paired by seed).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from audiomoe.analysis.grid import Run
from audiomoe.analysis.measure import MEASURE_FILE
from audiomoe.analysis.stats import aggregate, compare
from audiomoe.core.atomic import atomic_open
from audiomoe.core.errors import AudioMoEError

OUTCOME_FILE = "outcome.json"
FAILED_FILE = "failed.json"
_STEP_LINE = re.compile(r"^step (\d+)/\d+\s+loss ([-+0-9.eE]+|nan|inf)")
COST_KEYS = (
    "train_seconds",
    "wall_seconds",
    "params_total",
    "params_active",
    "moe_mflops_per_audio_s",
    "real_experts_per_token",
    "null_share",
)


def run_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """``eval_after`` metrics of a summary, with ``mean/<m>`` and ``worst/<m>`` over tasks for every metric name."""
    ev = {k: float(v) for k, v in (summary.get("eval_after") or {}).items() if "/" in k and isinstance(v, (int, float))}
    by_name: dict[str, list[float]] = {}
    for k, v in ev.items():
        by_name.setdefault(k.split("/", 1)[1], []).append(v)
    for m, vs in sorted(by_name.items()):
        if len(vs) > 1:
            ev[f"mean/{m}"] = sum(vs) / len(vs)
            ev[f"worst/{m}"] = min(vs)
    return ev


def read_json(path: Path) -> Optional[dict[str, Any]]:
    """A JSON file's content, or None when it is missing or damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def training_curve(run_dir: str | Path) -> tuple[list[int], list[float], str]:
    """``(steps, losses, source)``: the trainer's per-step ``log.jsonl``, else a summary ``history``, else the progress lines in ``train.log``.

    ``log.jsonl`` comes first: it has a loss every ``log_every`` steps, where a summary history (the
    trainer keeps one per evaluation) would have a point per eval only.
    """
    run_dir = Path(run_dir)
    from audiomoe.analysis.measure import train_dir

    summary = read_json(train_dir(run_dir) / "summary.json") or {}
    hist = summary.get("history")
    steps, losses = [], []
    log = train_dir(run_dir) / "log.jsonl"  # the recipe trainer's per-step records (issue 15)
    if log.is_file():
        latest: dict[str, float] = {}  # each task's last loss: the curve must not move with the batch's task mix
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not (
                isinstance(rec, dict) and isinstance(rec.get("step"), int) and isinstance(rec.get("loss"), (int, float))
            ):
                continue
            terms = {
                k: float(v)
                for k, v in (rec.get("losses") or {}).items()
                if k.startswith("task/") and isinstance(v, (int, float))
            }
            latest.update(terms)
            if terms or not latest:
                steps.append(rec["step"])
                losses.append(sum(latest.values()) / len(latest) if latest else float(rec["loss"]))
        if steps:
            return steps, losses, "log.jsonl (mean over tasks of each task's latest loss)" if latest else "log.jsonl"
    if isinstance(hist, list) and hist and all(isinstance(h, dict) and "step" in h and "loss" in h for h in hist):
        return [int(h["step"]) for h in hist], [float(h["loss"]) for h in hist], "summary history"
    for path in (run_dir / "train.log", run_dir / "stderr.log"):
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                m = _STEP_LINE.match(line.strip())
                if m:
                    steps.append(int(m.group(1)))
                    losses.append(float(m.group(2)))
            if steps:
                return steps, losses, "progress lines"
    return [], [], "none"


def eval_curve(run_dir: str | Path, metric: str = "accuracy") -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the mid-run evals in the summary's history: the mean over tasks of ``<task>/<metric>``."""
    from audiomoe.analysis.measure import train_dir

    summary = read_json(train_dir(Path(run_dir)) / "summary.json") or {}
    hist = summary.get("eval_history") or summary.get("history") or []  # the recipe trainer's key, then the older one
    steps, values = [], []
    for h in hist:
        vs = [
            float(v)
            for k, v in h.items()
            if isinstance(k, str) and k.endswith(f"/{metric}") and isinstance(v, (int, float))
        ]
        if isinstance(h.get("step"), int) and vs:
            steps.append(h["step"])
            values.append(sum(vs) / len(vs))
    return steps, values


def _moe_means(measure: Mapping[str, Any]) -> dict[str, float]:
    token = [r for r in (measure.get("routing") or {}).values() if r.get("kind") == "token"]
    if not token:
        return {}
    return {
        "real_experts_per_token": sum(r["real_experts_per_token"] for r in token) / len(token),
        "null_share": sum(r["null_share"] for r in token) / len(token),
    }


def add_groups(row: dict[str, Any], groups: Mapping[str, Sequence[str]]) -> None:
    """Add ``<group>/<metric>`` to ``row``: the mean over the group's tasks, where the run scored all of them."""
    names = {k.split("/", 1)[1] for k in row if k.count("/") == 1 and k.split("/", 1)[0] in _tasks_in(groups)}
    for group, tasks in groups.items():
        for m in sorted(names):
            vs = [row.get(f"{t}/{m}") for t in tasks]
            if f"{group}/{m}" in row:
                raise AudioMoEError(f"task_groups: '{group}' is also a task's name; give the group another name")
            if all(isinstance(v, (int, float)) for v in vs):
                row[f"{group}/{m}"] = sum(vs) / len(vs)


def _tasks_in(groups: Mapping[str, Sequence[str]]) -> set[str]:
    return {t for ts in groups.values() for t in ts}


def run_row(run: Run) -> dict[str, Any]:
    """The results row of one run (status ``missing`` when it never finished training)."""
    from audiomoe.analysis.measure import train_dir

    c = run.config
    row: dict[str, Any] = {"config": c.name, "arm": c.arm, "seed": run.seed, "target": c.target, "path": str(run.path)}
    row.update({f"grid/{k}": v for k, v in c.labels})
    summary = read_json(train_dir(run.path) / "summary.json")
    outcome = read_json(run.path / OUTCOME_FILE) or {}
    failed = read_json(run.path / FAILED_FILE)
    if summary is None:
        row["status"] = "failed" if failed else "missing"
        if failed:
            row["error"] = (failed.get("stderr_tail") or [""])[-1][:300]
        return row
    row["status"] = "ok"
    row["steps"] = summary.get("steps")
    row["final_loss"] = summary.get("final_loss")
    row["train_seconds"] = summary.get("seconds")
    row["wall_seconds"] = outcome.get("wall_seconds")
    measure = read_json(run.path / MEASURE_FILE)
    heldout = (measure or {}).get("heldout")
    if heldout:  # quality on the whole held-out split, item by item (measure.py), never a mean of a few batches
        row.update(heldout["metrics"])
        row["scored_on"] = (
            f"whole {heldout['split']} split ({min(t['items'] for t in heldout['tasks'].values())}+ items/task)"
        )
    else:
        row.update(run_metrics(summary))
        row["scored_on"] = "eval batches"
    if measure is None:
        row["measure"] = "failed" if failed else "missing"
        return row
    row["params_total"] = measure.get("params_total")
    row["params_active"] = measure.get("params_active")
    row["moe_mflops_per_audio_s"] = measure.get("moe_mflops_per_audio_s")
    row.update(_moe_means(measure))
    return row


def metric_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Metric columns of ``rows`` (``task/metric``, ``mean/...``, ``worst/...``), mean first, then sorted."""
    names = {k for r in rows for k in r if "/" in k and not k.startswith("grid/") and isinstance(r[k], (int, float))}
    return sorted(names, key=lambda k: (not k.startswith("mean/"), not k.startswith("worst/"), k))


def _write_table(path_stem: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with atomic_open(path_stem.with_suffix(".csv"), newline="", what="results table") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in cols})
    with atomic_open(path_stem.with_suffix(".jsonl"), what="results table") as fh:
        for r in rows:
            fh.write(json.dumps({k: _json(v) for k, v in r.items()}) + "\n")


def _cell(v: Any) -> Any:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _json(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def collect(
    runs: Sequence[Run],
    baselines: Mapping[str, str],
    root: str | Path,
    confidence: float = 0.95,
    groups: Optional[Mapping[str, Sequence[str]]] = None,
) -> dict[str, Any]:
    """Rows, aggregates and comparisons of ``runs``; written to ``root`` as ``results``, ``aggregate``, ``comparisons`` (.csv + .jsonl).

    ``groups`` (a study's ``task_groups``) adds a ``<group>/<metric>`` column per row: the mean over its tasks.
    """
    root = Path(root)
    rows = [run_row(r) for r in runs]
    for row in rows:
        add_groups(row, groups or {})
    metrics = metric_names(rows)
    cols = metrics + [k for k in ("final_loss", *COST_KEYS) if any(isinstance(r.get(k), (int, float)) for r in rows)]
    agg = aggregate(rows, cols, confidence=confidence)
    arm_of = {r["config"]: r["arm"] for r in rows}
    for a in agg:
        a["arm"] = arm_of.get(a["config"], "")
    comps: list[dict[str, Any]] = []
    for arm, base in baselines.items():
        arm_rows = [r for r in rows if r["arm"] == arm]
        names = list(dict.fromkeys(r["config"] for r in arm_rows))
        if base in names and len(names) > 1:
            comps += [{"arm": arm, **c} for c in compare(arm_rows, base, cols, configs=names, confidence=confidence)]
    root.mkdir(parents=True, exist_ok=True)
    _write_table(root / "results", rows)
    _write_table(root / "aggregate", agg)
    if comps:
        _write_table(root / "comparisons", comps)
    return {"rows": rows, "aggregate": agg, "comparisons": comps, "metrics": metrics}
