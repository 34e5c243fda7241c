"""The sections of a report as blocks (see :mod:`audiomoe.analysis.report_html`): chance level and the learning
check, routing plots and tables, the positive controls and claims, the training and mid-run eval curves.

:mod:`audiomoe.analysis.report` assembles them into a study's or a run's report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from audiomoe.analysis.plots import save_png, training_curves
from audiomoe.analysis.report_html import fmt
from audiomoe.analysis.results import read_json
from audiomoe.analysis.routing_plots import routing_figures

#: a router's mean top probability this close to 1/E is "stuck at uniform" (as the trainer's health check)
UNIFORM_TOLERANCE = 0.02
#: a config "learned" when every seed's key metric is at least this far above chance
LEARNED_MARGIN = 0.05


def chance_level(run_dir: Path) -> Optional[float]:
    """Mean over single-label classification heads of 1 / num_classes (a uniform guess's accuracy), from the run's spec."""
    info = read_json(run_dir / "train" / "run.json") or read_json(run_dir / "run.json") or {}
    tasks = (info.get("spec") or {}).get("tasks") or {}
    inv = [
        1.0 / t["params"]["num_classes"]
        for t in tasks.values()
        if isinstance(t, dict)
        and t.get("name") == "classification"
        and not t.get("params", {}).get("multi_label")
        and t.get("params", {}).get("num_classes")
    ]
    return sum(inv) / len(inv) if inv else None


def learning_check(
    agg: Sequence[Mapping[str, Any]], ok: Sequence[Mapping[str, Any]], metric: str, chance: float, seeds: int
) -> str:
    """One sentence: how many configs left chance level (every seed, the whole interval, the mean)."""
    per_seed: dict[str, list[float]] = {}
    for r in ok:
        if isinstance(r.get(metric), (int, float)):
            per_seed.setdefault(r["config"], []).append(float(r[metric]))
    learned = [
        a["config"] for a in agg if per_seed.get(a["config"]) and min(per_seed[a["config"]]) >= chance + LEARNED_MARGIN
    ]
    above = [
        a["config"] for a in agg if isinstance(a.get(f"{metric}/ci_low"), float) and a[f"{metric}/ci_low"] > chance
    ]
    near = [
        a["config"]
        for a in agg
        if isinstance(a.get(f"{metric}/mean"), float) and a[f"{metric}/mean"] < chance + LEARNED_MARGIN
    ]
    text = (
        f"Learning check: {len(learned)} of {len(agg)} configs score at least {LEARNED_MARGIN} above chance at every seed"
        + (f" ({', '.join(learned)})" if learned and len(learned) < len(agg) else "")
        + f"; {len(above)} have their whole 95% interval above chance"
    )
    if seeds == 2:
        text += " (with 2 seeds a t interval spans ±12.7 standard errors, so few do)"
    text += f"; {len(near)} have a mean within {LEARNED_MARGIN} of chance."
    if len(near) * 2 > len(agg):
        text += " At this scale most runs have barely left chance level, so quality claims are not expected to resolve."
    return text


def _confidence_by_task(measures: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[list[Any]]:
    rows = []
    for cfg, ms in measures.items():
        for lay in dict.fromkeys(n for m in ms for n in m["routing"]):
            recs = [m["routing"][lay] for m in ms if "top_prob_by_task" in m["routing"].get(lay, {})]
            if not recs:
                continue
            uniform = recs[0].get("uniform_prob") or 1.0 / max(recs[0]["columns"], 1)
            for task in sorted({t for r in recs for t in r["top_prob_by_task"]}):
                vals = [r["top_prob_by_task"][task] for r in recs if task in r["top_prob_by_task"]]
                mean = sum(vals) / len(vals)
                rows.append([cfg, lay, task, fmt(mean), fmt(uniform), f"{mean - uniform:+.3f}"])
    return rows


def routing_blocks(
    measures: Mapping[str, Sequence[Mapping[str, Any]]], plots: Path, by_task: bool = False
) -> list[tuple]:
    """Routing plots and a per-layer table for ``{config: [measure.json, ...]}``."""
    blocks: list[tuple] = []
    figs = routing_figures(measures, by_task=by_task)
    captions = {
        "experts_per_layer": "Routed experts per token per MoE layer (null picks excluded; the shape of UniMoE-Audio Fig. 4/5).",
        "null_share": "Share of each layer's expert picks that went to null experts (computation skipped).",
        "expert_load": "Expert load per task: each row is the share of that task's token picks per expert.",
        "weak_selection": "MoWE weak-encoder selection per task: share of the task's samples whose router picked each weak encoder.",
    }
    for key, fig in figs.items():
        blocks.append(("img", str(save_png(fig, plots / f"{key}.png")), captions[key]))
    rows, flat = [], []
    for cfg, ms in measures.items():
        layers = list(dict.fromkeys(n for m in ms for n in m["routing"]))
        for lay in layers:
            rs = [m["routing"][lay] for m in ms if lay in m["routing"]]

            def mean(k: str, rs: list = rs) -> float:
                return sum(r[k] for r in rs) / len(rs)

            tops = [r["top_prob"] for r in rs if isinstance(r.get("top_prob"), (int, float))]
            top = sum(tops) / len(tops) if tops else None
            uniform = 1.0 / max(rs[0]["columns"], 1)
            if top is not None and top - uniform < UNIFORM_TOLERANCE:
                flat.append(f"{lay} of {cfg}")
            rows.append(
                [
                    cfg,
                    lay,
                    rs[0]["kind"],
                    rs[0]["columns"],
                    fmt(mean("real_experts_per_token"), 2),
                    fmt(mean("null_share"), 3),
                    f"{fmt(top)} (1/E {uniform:.3f})" if top is not None else "–",
                ]
            )
    by_task = _confidence_by_task(measures)
    if by_task:
        blocks += [
            ("h3", "Router confidence per task (held-out data)"),
            (
                "p",
                "Mean top probability of each per-sample router (the MoWE weak-encoder routers) on each task's held-out items, "
                "against a uniform router's 1/E: a router that learned which encoder serves a task sits well above it.",
            ),
            ("table", ["config", "layer", "task", "mean top probability", "uniform 1/E", "above uniform by"], by_task),
        ]
    if "experts_per_layer" in figs and "null_share" not in figs:
        blocks.append(("p", "No null experts in these models: no null-share plot (every pick runs an expert)."))
    if rows:
        blocks += [
            ("h3", "Routing per layer"),
            (
                "table",
                ["config", "layer", "routes", "columns", "experts per item (real)", "null share", "router top prob"],
                rows,
            ),
        ]
    if flat:
        blocks.append(
            (
                "p",
                f"Near uniform (mean top router probability within {UNIFORM_TOLERANCE} of 1/E on held-out data): {', '.join(flat)}. "
                "These routers learned no preference: their picks (however lopsided per task in the plots above) come from "
                "near-ties, so a comparison between them measures the layer's architecture, not learned routing.",
            )
        )
    if not figs:
        blocks.append(("p", "No routed layer in these models: no routing plots."))
    return blocks


def _interval(c: Mapping[str, Any]) -> str:
    if c.get("difference") is None:
        return "–"
    iv = c.get("interval")
    return f"{c['difference']:+.3f}" + (f" [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else " (deterministic)")


def eval_curves_block(
    curves: Mapping[str, Sequence[tuple]], plots: Path, groups: Optional[Mapping[str, str]] = None
) -> list[tuple]:
    """Mid-run eval accuracy per config (a few batches each time: a curve to watch, not the score that ranks runs)."""
    curves = {k: v for k, v in curves.items() if v and any(len(s) > 1 for s, _ in v)}
    if not curves:
        return [("p", "Eval curves: none (each run evaluated once or not at all during training).")]
    fig = training_curves(
        curves,
        title="mid-run eval accuracy",
        groups=groups,
        ylabel="mean accuracy over tasks (eval batches)",
        smooth=False,
    )
    return [
        (
            "img",
            str(save_png(fig, plots / "eval_curves.png")),
            "Mean accuracy over tasks at each mid-run eval (thin: seeds, thick: their mean). These evals use a few held-out "
            "batches to show the trend; the tables and claims use the whole held-out split, item by item.",
        )
    ]


def claims_blocks(claims: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """The positive controls (which gate everything else), then the claims with difference, interval, p and MDE."""
    blocks: list[tuple] = []
    controls = [c for c in claims if c.get("role") == "control"]
    rest = [c for c in claims if c.get("role") != "control"]
    if controls:
        blocks += [
            ("h2", "Positive controls"),
            (
                "p",
                "A positive control compares configs whose difference is known to exist. Until every control resolves "
                "(interval above 0), the study cannot detect a known effect and the claims below are not interpreted.",
            ),
            (
                "table",
                ["#", "control", "resolved", "difference [95% CI]", "p", "in plain words"],
                [
                    [
                        c["id"],
                        c["claim"],
                        "yes" if c.get("resolved") else "no",
                        _interval(c),
                        fmt(c.get("p"), 3),
                        c["plain"],
                    ]
                    for c in controls
                ],
            ),
        ]
    if rest:
        blocks += [
            ("h2", "Paper claims at this scale"),
            (
                "p",
                "Difference: candidate minus the reference it is closest to failing against, 95% interval paired by seed "
                "(clipped to the metric's range). MDE: the smallest difference these seeds detect with power 0.8; "
                "'equivalent': within ±margin by two one-sided tests. Metrics marked exploratory are secondary.",
            ),
            (
                "table",
                [
                    "#",
                    "claim",
                    "metric",
                    "verdict",
                    "difference [95% CI]",
                    "p",
                    "MDE",
                    "what was measured",
                    "in plain words",
                ],
                [
                    [
                        c["id"],
                        c["claim"] + (f" ({c['source']})" if c.get("source") else ""),
                        c.get("metric", ""),
                        c["verdict"],
                        _interval(c),
                        fmt(c.get("p"), 3),
                        fmt(c.get("minimum_detectable_effect"), 3),
                        c["measured"] + ("; " + c["differences"] if c.get("differences") else ""),
                        c["plain"],
                    ]
                    for c in rest
                ],
            ),
        ]
    return blocks


def curves_block(
    curves: Mapping[str, Sequence[tuple]], plots: Path, groups: Optional[Mapping[str, str]] = None
) -> list[tuple]:
    """The training-curve plot (one panel per arm with ``groups``: config -> arm), or a sentence saying why there is none."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return [("p", "Training curves: none (the runs recorded no history and no progress lines).")]
    one = sum(len(v) for v in curves.values()) == 1
    fig = training_curves(curves, title="training loss" if one else "training loss per config", groups=groups)
    caption = (
        "Training loss of this run, smoothed (from its training log)."
        if one
        else "Training loss per config (one panel per arm): thin lines are seeds, thick lines their mean, both smoothed (from each run's "
        "training log)."
    ) + " A multi-stage recipe's curve is its main model's steps (specialists train in runs of their own, not drawn)."
    return [("img", str(save_png(fig, plots / "training_curves.png")), caption)]
