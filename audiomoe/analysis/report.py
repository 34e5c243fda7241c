"""``report.md`` and a self-contained ``report.html`` (PNGs embedded as base64) for a study or for one run.

Both are rendered from one list of blocks (heading, paragraph, table, image, code), so the two files
always say the same. Plots are written to ``plots/*.png`` beside the report (the Markdown links
them; the HTML carries them inline and can be mailed alone). This module assembles the two reports;
the sections live in :mod:`audiomoe.analysis.report_blocks`, the rendering in :mod:`audiomoe.analysis.report_html`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from audiomoe.analysis.plots import metric_by_config, save_png
from audiomoe.analysis.report_blocks import (
    chance_level,
    claims_blocks,
    curves_block,
    eval_curves_block,
    learning_check,
    routing_blocks,
)
from audiomoe.analysis.report_html import ci_text, fmt, write
from audiomoe.analysis.results import eval_curve, read_json, training_curve


def _scored_on(metric: str, ok: Sequence[Mapping[str, Any]]) -> str:
    if metric == "final_loss":
        return "the training loss of the last batch: noisy, not held out"
    where = sorted({str(r.get("scored_on")) for r in ok if r.get("scored_on")})
    if where and all(w.startswith("whole") for w in where):
        return f"scored item by item on the {' / '.join(where)}, the same items for every run"
    return (
        "held-out eval of the last step: the mean over a few eval batches, which cannot rank close models; "
        "rerun the same `audiomoe ablate` command: it measures the runs again (no training) and scores the whole split"
    )


def study_report(
    root: Path,
    title: str,
    description: str,
    plan: Any,
    collected: Mapping[str, Any],
    claims: Sequence[Mapping[str, Any]],
    seconds: Optional[float] = None,
    ran: Optional[int] = None,
) -> tuple[Path, Path]:
    """The study report: claims, the aggregate table, comparisons, plots, failures, skipped arms."""
    rows, agg, comps, metric = collected["rows"], collected["aggregate"], collected["comparisons"], plan.metric
    plots = root / "plots"
    ok = [r for r in rows if r.get("status") == "ok"]
    chance = chance_level(Path(ok[0]["path"])) if ok and metric == "mean/accuracy" else None
    blocks: list[tuple] = [("h1", title)]
    if description:
        blocks.append(("p", description.strip()))
    when = f" in {seconds / 60:.1f} min" if seconds else ""
    if (
        seconds and ran is not None and ran < len(rows)
    ):  # a rerun: its time is that of the runs it trained, not the study's
        when = f"; this invocation ran {ran} of them in {seconds / 60:.1f} min, the others were already done"
    blocks.append(
        (
            "p",
            f"{len(ok)} of {len(rows)} runs finished{when}: {len(plan.configs)} config{'s' * (len(plan.configs) != 1)} x {plan.seeds_text()}. "
            f"Key metric `{metric}` ({_scored_on(metric, ok)}); intervals are 95% t intervals over seeds; "
            f"differences are paired by seed."
            + (f" Chance level of `{metric}` (uniform guess) is {chance:.3f}." if chance else ""),
        )
    )
    if chance is not None and agg:
        blocks.append(("p", learning_check(agg, ok, metric, chance, len(plan.seeds))))
    if claims:
        blocks += claims_blocks(claims)
    if plan.skipped:
        blocks += [("h3", "Skipped arms"), ("table", ["arm", "why"], [[a, w] for a, w in plan.skipped.items()])]
    blocks.append(("h2", "Results per config"))
    per_task = [m for m in collected["metrics"] if not m.startswith(("mean/", "worst/")) and m.endswith("/accuracy")]
    header = (
        ["config", "arm", "ok/runs", metric]
        + per_task
        + ["MoE MFLOPs / audio s", "active params", "experts/token", "null share", "train s"]
    )
    table = [
        [a["config"], a.get("arm", ""), f"{a['ok']}/{a['runs']}", ci_text(a, metric)]
        + [fmt(a.get(f"{m}/mean")) for m in per_task]
        + [
            fmt(a.get("moe_mflops_per_audio_s/mean"), 2),
            fmt(a.get("params_active/mean")),
            fmt(a.get("real_experts_per_token/mean"), 2),
            fmt(a.get("null_share/mean")),
            fmt(a.get("train_seconds/mean"), 1),
        ]
        for a in agg
    ]
    blocks.append(("table", header, table))
    if agg:
        fig = metric_by_config(agg, rows, metric, chance=chance)
        blocks.append(
            (
                "img",
                str(save_png(fig, plots / "metric.png")),
                f"{metric} per config: bars are means, whiskers 95% CIs over seeds, dots single seeds.",
            )
        )
        cost = [
            a
            for a in agg
            if isinstance(a.get("moe_mflops_per_audio_s/mean"), float)
            and math.isfinite(a["moe_mflops_per_audio_s/mean"])
        ]
        if cost:
            fig = metric_by_config(
                cost,
                rows,
                "moe_mflops_per_audio_s",
                title="measured MoE MFLOPs per audio second (mean, 95% CI)",
                arms=list(dict.fromkeys(a.get("arm", "") for a in agg)),
            )
            blocks.append(
                (
                    "img",
                    str(save_png(fig, plots / "moe_flops.png")),
                    "Measured MoE FLOPs per second of audio: 2 x (routed pairs x expert params + tokens x (router + shared params)).",
                )
            )
    sel = [c for c in comps if c["metric"] in (metric, "moe_mflops_per_audio_s") and c["n"]]
    if sel:
        blocks += [
            ("h2", "Differences against each arm's baseline (paired by seed)"),
            (
                "table",
                ["arm", "config", "baseline", "metric", "difference", "95% CI", "p", "n", "verdict"],
                [
                    [
                        c["arm"],
                        c["config"],
                        c["baseline"],
                        c["metric"],
                        fmt(c["mean_diff"]),
                        "deterministic"
                        if c["n"] >= 2 and c["std_diff"] == 0
                        else f"[{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]",
                        "–" if c["n"] >= 2 and c["std_diff"] == 0 else fmt(c["p"]),
                        c["n"],
                        c["verdict"],
                    ]
                    for c in sel
                ],
            ),
        ]
    measures: dict[str, list] = {}
    curves: dict[str, list] = {}
    evals: dict[str, list] = {}
    for r in ok:
        m = read_json(Path(r["path"]) / "measure.json")
        if m:
            measures.setdefault(r["config"], []).append(m)
        steps, losses, _ = training_curve(r["path"])
        if steps:
            curves.setdefault(r["config"], []).append((steps, losses))
        e_steps, e_values = eval_curve(r["path"])
        if e_steps:
            evals.setdefault(r["config"], []).append((e_steps, e_values))
    blocks.append(("h2", "Routing health (held-out eval pass)"))
    blocks += routing_blocks(measures, plots) if measures else [("p", "No run was measured.")]
    blocks.append(("h2", "Training curves"))
    blocks += curves_block(curves, plots, {r["config"]: r.get("arm", "") for r in ok})
    blocks += eval_curves_block(evals, plots, {r["config"]: r.get("arm", "") for r in ok})
    failed = [r for r in rows if r.get("status") != "ok" or r.get("measure") in ("failed", "missing")]
    if failed:
        blocks += [
            ("h2", "Failed or unfinished runs"),
            (
                "table",
                ["config", "seed", "status", "last log line", "directory"],
                [
                    [
                        r["config"],
                        r["seed"],
                        r.get("status") if r.get("status") != "ok" else "measure " + r.get("measure", ""),
                        r.get("error", ""),
                        r["path"],
                    ]
                    for r in failed
                ],
            ),
        ]
    blocks += [
        ("h2", "Files"),
        (
            "p",
            "`results.csv` / `results.jsonl` (one row per run), `aggregate.csv` / `.jsonl` (one row per config), "
            "`comparisons.csv` / `.jsonl` (every metric against the baseline), `runs/<config>/seed-<n>/` (training run, `train.log`, `measure.json`).",
        ),
    ]
    return write(root, blocks, title)


def run_report(run_dir: Path, measure: Mapping[str, Any], summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """One run's report: eval metrics, parameters and compute, routing plots by task, its training curve."""
    from audiomoe.analysis.results import run_metrics

    plots = run_dir / "plots"
    metrics = run_metrics(summary)
    blocks: list[tuple] = [
        ("h1", f"Run report: {run_dir}"),
        (
            "p",
            f"Checkpoint `{measure.get('checkpoint')}`; routing measured on {measure.get('batches')} held-out batches "
            f"({measure.get('items')} items, {measure.get('audio_seconds', 0):.1f} s of audio, data `{measure.get('data')}`).",
        ),
    ]
    if metrics:
        blocks += [
            ("h2", "Eval metrics (last step)"),
            ("table", ["metric", "value"], [[k, fmt(v)] for k, v in sorted(metrics.items())]),
        ]
    blocks += [
        ("h2", "Parameters and compute"),
        (
            "table",
            ["quantity", "value"],
            [
                ["total parameters", fmt(measure.get("params_total"))],
                ["active parameters per token (measured)", fmt(measure.get("params_active"))],
                ["MoE MFLOPs per audio second (measured)", fmt(measure.get("moe_mflops_per_audio_s"), 2)],
                ["training seconds", fmt(summary.get("seconds"), 1)],
                ["steps", fmt(summary.get("steps"))],
            ],
        ),
    ]
    blocks.append(("h2", "Routing by task"))
    blocks += routing_blocks({"run": [measure]}, plots, by_task=True)
    steps, losses, source = training_curve(run_dir)
    blocks.append(("h2", "Training curve"))
    blocks += curves_block({"run": [(steps, losses)] if steps else []}, plots)
    return write(run_dir, blocks, f"audiomoe run report: {run_dir.name}")
