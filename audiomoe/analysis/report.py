"""``report.md`` and a self-contained ``report.html`` (PNGs embedded as base64) for a study or for one run.

Both are rendered from one list of blocks (heading, paragraph, table, image, code), so the two files
always say the same. Plots are written to ``plots/*.png`` beside the report (the Markdown links
them; the HTML carries them inline and can be mailed alone).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from audiomoe.core.atomic import write_text
from audiomoe.analysis.plots import metric_by_config, routing_figures, save_png, training_curves
from audiomoe.analysis.results import eval_curve, read_json, training_curve

CSS = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.8em 0;font-size:12.5px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
figcaption{font-size:12px;color:#555;margin-bottom:1.2em}code,pre{background:#f6f6f6;padding:2px 4px;font-size:12px}pre{padding:8px;overflow-x:auto}
.holds{color:#1a7f37;font-weight:bold}.does-not-hold{color:#b42318;font-weight:bold}.not-resolved{color:#9a6700;font-weight:bold}.not-measured{color:#666;font-weight:bold}.scroll{overflow-x:auto}"""


UNIFORM_TOLERANCE = 0.02  # a router's mean top probability this close to 1/E is "stuck at uniform" (as the trainer's health check)
LEARNED_MARGIN = 0.05  # a config "learned" when every seed's key metric is at least this far above chance


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals (large ones with thousands separators), None/NaN as ``–``."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def ci_text(a: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """``mean ± std [lo, hi]`` of aggregate row ``a`` for ``key`` (``mean`` alone with one seed)."""
    m, s, lo, hi = (a.get(f"{key}/{x}") for x in ("mean", "std", "ci_low", "ci_high"))
    if m is None or not math.isfinite(m):
        return "–"
    if s is None or not math.isfinite(s):
        return fmt(m, digits)
    if s == 0 and (a.get(f"{key}/n") or 0) >= 2:  # the same at every seed: a zero-width interval would claim certainty
        return f"{m:.{digits}f} (every seed)"
    return f"{m:.{digits}f} ± {s:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def render(blocks: Sequence[tuple], root: Path, title: str) -> tuple[str, str]:
    """``(markdown, html)`` of ``blocks``; image paths are relative to ``root``."""
    md, body = [], []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            md.append("#" * int(kind[1]) + " " + b[1])
            body.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "p":
            md.append(b[1])
            body.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "pre":
            md.append("```\n" + b[1] + "\n```")
            body.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "table":
            header, rows = b[1], b[2]
            cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            md.append("\n".join(["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                                + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]))  # fmt: skip
            th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            trs = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
            body.append(f'<div class="scroll"><table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table></div>')
        elif kind == "img":
            path, caption = Path(b[1]), b[2]
            rel = path.relative_to(root).as_posix()
            md.append(f"![{caption}]({rel})\n\n*{caption}*")
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    page = f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    return "\n\n".join(md) + "\n", page


def _inline(text: str) -> str:
    out, code = [], False
    for i, part in enumerate(text.split("`")):
        out.append(f"<code>{html.escape(part)}</code>" if code else html.escape(part).replace("**", ""))
        code = not code
    return "".join(out)


def _td(c: Any) -> str:
    s = str(c)
    cls = {"holds": "holds", "does not hold": "does-not-hold", "not resolved": "not-resolved", "not measured": "not-measured"}.get(s)
    return f'<td class="{cls}">{html.escape(s)}</td>' if cls else f"<td>{_inline(s)}</td>"


def write(root: Path, blocks: Sequence[tuple], title: str, stem: str = "report") -> tuple[Path, Path]:
    """Write ``root/<stem>.md`` and ``root/<stem>.html``."""
    md, page = render(blocks, root, title)
    write_text(root / f"{stem}.md", md, what="report")
    write_text(root / f"{stem}.html", page, what="report")
    return root / f"{stem}.md", root / f"{stem}.html"


def chance_level(run_dir: Path) -> Optional[float]:
    """Mean over single-label classification heads of 1 / num_classes (a uniform guess's accuracy), from the run's spec."""
    info = read_json(run_dir / "train" / "run.json") or read_json(run_dir / "run.json") or {}
    tasks = (info.get("spec") or {}).get("tasks") or {}
    inv = [1.0 / t["params"]["num_classes"] for t in tasks.values()
           if isinstance(t, dict) and t.get("name") == "classification" and not t.get("params", {}).get("multi_label") and t.get("params", {}).get("num_classes")]  # fmt: skip
    return sum(inv) / len(inv) if inv else None


def learning_check(agg: Sequence[Mapping[str, Any]], ok: Sequence[Mapping[str, Any]], metric: str, chance: float, seeds: int) -> str:
    """One sentence: how many configs left chance level (every seed, the whole interval, the mean)."""
    per_seed: dict[str, list[float]] = {}
    for r in ok:
        if isinstance(r.get(metric), (int, float)):
            per_seed.setdefault(r["config"], []).append(float(r[metric]))
    learned = [a["config"] for a in agg if per_seed.get(a["config"]) and min(per_seed[a["config"]]) >= chance + LEARNED_MARGIN]
    above = [a["config"] for a in agg if isinstance(a.get(f"{metric}/ci_low"), float) and a[f"{metric}/ci_low"] > chance]
    near = [a["config"] for a in agg if isinstance(a.get(f"{metric}/mean"), float) and a[f"{metric}/mean"] < chance + LEARNED_MARGIN]
    text = (f"Learning check: {len(learned)} of {len(agg)} configs score at least {LEARNED_MARGIN} above chance at every seed"
            + (f" ({', '.join(learned)})" if learned and len(learned) < len(agg) else "")
            + f"; {len(above)} have their whole 95% interval above chance")
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


def routing_blocks(measures: Mapping[str, Sequence[Mapping[str, Any]]], plots: Path, by_task: bool = False) -> list[tuple]:
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
            mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
            tops = [r["top_prob"] for r in rs if isinstance(r.get("top_prob"), (int, float))]
            top = sum(tops) / len(tops) if tops else None
            uniform = 1.0 / max(rs[0]["columns"], 1)
            if top is not None and top - uniform < UNIFORM_TOLERANCE:
                flat.append(f"{lay} of {cfg}")
            rows.append([cfg, lay, rs[0]["kind"], rs[0]["columns"], fmt(mean("real_experts_per_token"), 2), fmt(mean("null_share"), 3),
                         f"{fmt(top)} (1/E {uniform:.3f})" if top is not None else "–"])  # fmt: skip
    by_task = _confidence_by_task(measures)
    if by_task:
        blocks += [("h3", "Router confidence per task (held-out data)"),
                   ("p", "Mean top probability of each per-sample router (the MoWE weak-encoder routers) on each task's held-out items, "
                         "against a uniform router's 1/E: a router that learned which encoder serves a task sits well above it."),
                   ("table", ["config", "layer", "task", "mean top probability", "uniform 1/E", "above uniform by"], by_task)]
    if "experts_per_layer" in figs and "null_share" not in figs:
        blocks.append(("p", "No null experts in these models: no null-share plot (every pick runs an expert)."))
    if rows:
        blocks += [("h3", "Routing per layer"),
                   ("table", ["config", "layer", "routes", "columns", "experts per item (real)", "null share", "router top prob"], rows)]
    if flat:
        blocks.append(("p", f"Near uniform (mean top router probability within {UNIFORM_TOLERANCE} of 1/E on held-out data): {', '.join(flat)}. "
                            "These routers learned no preference: their picks (however lopsided per task in the plots above) come from "
                            "near-ties, so a comparison between them measures the layer's architecture, not learned routing."))  # fmt: skip
    if not figs:
        blocks.append(("p", "No routed layer in these models: no routing plots."))
    return blocks


def _interval(c: Mapping[str, Any]) -> str:
    if c.get("difference") is None:
        return "–"
    iv = c.get("interval")
    return f"{c['difference']:+.3f}" + (f" [{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else " (deterministic)")


def eval_curves_block(curves: Mapping[str, Sequence[tuple]], plots: Path, groups: Optional[Mapping[str, str]] = None) -> list[tuple]:
    """Mid-run eval accuracy per config (a few batches each time: a curve to watch, not the score that ranks runs)."""
    curves = {k: v for k, v in curves.items() if v and any(len(s) > 1 for s, _ in v)}
    if not curves:
        return [("p", "Eval curves: none (each run evaluated once or not at all during training).")]
    fig = training_curves(curves, title="mid-run eval accuracy", groups=groups, ylabel="mean accuracy over tasks (eval batches)", smooth=False)
    return [("img", str(save_png(fig, plots / "eval_curves.png")),
             "Mean accuracy over tasks at each mid-run eval (thin: seeds, thick: their mean). These evals use a few held-out "
             "batches to show the trend; the tables and claims use the whole held-out split, item by item.")]


def claims_blocks(claims: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """The positive controls (which gate everything else), then the claims with difference, interval, p and MDE."""
    blocks: list[tuple] = []
    controls = [c for c in claims if c.get("role") == "control"]
    rest = [c for c in claims if c.get("role") != "control"]
    if controls:
        blocks += [("h2", "Positive controls"),
                   ("p", "A positive control compares configs whose difference is known to exist. Until every control resolves "
                         "(interval above 0), the study cannot detect a known effect and the claims below are not interpreted."),
                   ("table", ["#", "control", "resolved", "difference [95% CI]", "p", "in plain words"],
                    [[c["id"], c["claim"], "yes" if c.get("resolved") else "no", _interval(c), fmt(c.get("p"), 3), c["plain"]]
                     for c in controls])]
    if rest:
        blocks += [("h2", "Paper claims at this scale"),
                   ("p", "Difference: candidate minus the reference it is closest to failing against, 95% interval paired by seed "
                         "(clipped to the metric's range). MDE: the smallest difference these seeds detect with power 0.8; "
                         "'equivalent': within ±margin by two one-sided tests. Metrics marked exploratory are secondary."),
                   ("table", ["#", "claim", "metric", "verdict", "difference [95% CI]", "p", "MDE", "what was measured", "in plain words"],
                    [[c["id"], c["claim"] + (f" ({c['source']})" if c.get("source") else ""), c.get("metric", ""), c["verdict"],
                      _interval(c), fmt(c.get("p"), 3), fmt(c.get("minimum_detectable_effect"), 3),
                      c["measured"] + ("; " + c["differences"] if c.get("differences") else ""), c["plain"]] for c in rest])]
    return blocks


def curves_block(curves: Mapping[str, Sequence[tuple]], plots: Path, groups: Optional[Mapping[str, str]] = None) -> list[tuple]:
    """The training-curve plot (one panel per arm with ``groups``: config -> arm), or a sentence saying why there is none."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return [("p", "Training curves: none (the runs recorded no history and no progress lines).")]
    one = sum(len(v) for v in curves.values()) == 1
    fig = training_curves(curves, title="training loss" if one else "training loss per config", groups=groups)
    caption = ("Training loss of this run, smoothed (from its training log)." if one else
               "Training loss per config (one panel per arm): thin lines are seeds, thick lines their mean, both smoothed (from each run's "
               "training log).") + " A multi-stage recipe's curve is its main model's steps (specialists train in runs of their own, not drawn)."  # fmt: skip
    return [("img", str(save_png(fig, plots / "training_curves.png")), caption)]


def _scored_on(metric: str, ok: Sequence[Mapping[str, Any]]) -> str:
    if metric == "final_loss":
        return "the training loss of the last batch: noisy, not held out"
    where = sorted({str(r.get("scored_on")) for r in ok if r.get("scored_on")})
    if where and all(w.startswith("whole") for w in where):
        return f"scored item by item on the {' / '.join(where)}, the same items for every run"
    return ("held-out eval of the last step: the mean over a few eval batches, which cannot rank close models; "
            "rerun the same `audiomoe ablate` command: it measures the runs again (no training) and scores the whole split")


def study_report(root: Path, title: str, description: str, plan: Any, collected: Mapping[str, Any], claims: Sequence[Mapping[str, Any]],
                 seconds: Optional[float] = None, ran: Optional[int] = None) -> tuple[Path, Path]:
    """The study report: claims, the aggregate table, comparisons, plots, failures, skipped arms."""
    rows, agg, comps, metric = collected["rows"], collected["aggregate"], collected["comparisons"], plan.metric
    plots = root / "plots"
    ok = [r for r in rows if r.get("status") == "ok"]
    chance = chance_level(Path(ok[0]["path"])) if ok and metric == "mean/accuracy" else None
    blocks: list[tuple] = [("h1", title)]
    if description:
        blocks.append(("p", description.strip()))
    when = f" in {seconds / 60:.1f} min" if seconds else ""
    if seconds and ran is not None and ran < len(rows):  # a rerun: its time is that of the runs it trained, not the study's
        when = f"; this invocation ran {ran} of them in {seconds / 60:.1f} min, the others were already done"
    blocks.append(("p", f"{len(ok)} of {len(rows)} runs finished{when}: {len(plan.configs)} config{'s' * (len(plan.configs) != 1)} x {len(plan.seeds)} seed{'s' * (len(plan.seeds) != 1)}. "
                        f"Key metric `{metric}` ({_scored_on(metric, ok)}); intervals are 95% t intervals over seeds; "
                        f"differences are paired by seed." + (f" Chance level of `{metric}` (uniform guess) is {chance:.3f}." if chance else "")))  # fmt: skip
    if chance is not None and agg:
        blocks.append(("p", learning_check(agg, ok, metric, chance, len(plan.seeds))))
    if claims:
        blocks += claims_blocks(claims)
    if plan.skipped:
        blocks += [("h3", "Skipped arms"), ("table", ["arm", "why"], [[a, w] for a, w in plan.skipped.items()])]
    blocks.append(("h2", "Results per config"))
    per_task = [m for m in collected["metrics"] if not m.startswith(("mean/", "worst/")) and m.endswith("/accuracy")]
    header = ["config", "arm", "ok/runs", metric] + per_task + ["MoE MFLOPs / audio s", "active params", "experts/token", "null share", "train s"]
    table = [[a["config"], a.get("arm", ""), f"{a['ok']}/{a['runs']}", ci_text(a, metric)] + [fmt(a.get(f"{m}/mean")) for m in per_task]
             + [fmt(a.get("moe_mflops_per_audio_s/mean"), 2), fmt(a.get("params_active/mean")), fmt(a.get("real_experts_per_token/mean"), 2),
                fmt(a.get("null_share/mean")), fmt(a.get("train_seconds/mean"), 1)] for a in agg]  # fmt: skip
    blocks.append(("table", header, table))
    if agg:
        fig = metric_by_config(agg, rows, metric, chance=chance)
        blocks.append(("img", str(save_png(fig, plots / "metric.png")), f"{metric} per config: bars are means, whiskers 95% CIs over seeds, dots single seeds."))
        cost = [a for a in agg if isinstance(a.get("moe_mflops_per_audio_s/mean"), float) and math.isfinite(a["moe_mflops_per_audio_s/mean"])]
        if cost:
            fig = metric_by_config(cost, rows, "moe_mflops_per_audio_s", title="measured MoE MFLOPs per audio second (mean, 95% CI)",
                                   arms=list(dict.fromkeys(a.get("arm", "") for a in agg)))  # fmt: skip
            blocks.append(("img", str(save_png(fig, plots / "moe_flops.png")), "Measured MoE FLOPs per second of audio: 2 x (routed pairs x expert params + tokens x (router + shared params))."))
    sel = [c for c in comps if c["metric"] in (metric, "moe_mflops_per_audio_s") and c["n"]]
    if sel:
        blocks += [("h2", "Differences against each arm's baseline (paired by seed)"),
                   ("table", ["arm", "config", "baseline", "metric", "difference", "95% CI", "p", "n", "verdict"],
                    [[c["arm"], c["config"], c["baseline"], c["metric"], fmt(c["mean_diff"]),
                      "deterministic" if c["n"] >= 2 and c["std_diff"] == 0 else f"[{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]",
                      "–" if c["n"] >= 2 and c["std_diff"] == 0 else fmt(c["p"]), c["n"], c["verdict"]] for c in sel])]
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
        blocks += [("h2", "Failed or unfinished runs"), ("table", ["config", "seed", "status", "last log line", "directory"],
                    [[r["config"], r["seed"], r.get("status") if r.get("status") != "ok" else "measure " + r.get("measure", ""), r.get("error", ""), r["path"]] for r in failed])]  # fmt: skip
    blocks += [("h2", "Files"), ("p", "`results.csv` / `results.jsonl` (one row per run), `aggregate.csv` / `.jsonl` (one row per config), "
                "`comparisons.csv` / `.jsonl` (every metric against the baseline), `runs/<config>/seed-<n>/` (training run, `train.log`, `measure.json`).")]  # fmt: skip
    return write(root, blocks, title)


def run_report(run_dir: Path, measure: Mapping[str, Any], summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """One run's report: eval metrics, parameters and compute, routing plots by task, its training curve."""
    from audiomoe.analysis.results import run_metrics

    plots = run_dir / "plots"
    metrics = run_metrics(summary)
    blocks: list[tuple] = [("h1", f"Run report: {run_dir}"),
                           ("p", f"Checkpoint `{measure.get('checkpoint')}`; routing measured on {measure.get('batches')} held-out batches "
                                 f"({measure.get('items')} items, {measure.get('audio_seconds', 0):.1f} s of audio, data `{measure.get('data')}`).")]  # fmt: skip
    if metrics:
        blocks += [("h2", "Eval metrics (last step)"), ("table", ["metric", "value"], [[k, fmt(v)] for k, v in sorted(metrics.items())])]
    blocks += [("h2", "Parameters and compute"), ("table", ["quantity", "value"], [
        ["total parameters", fmt(measure.get("params_total"))], ["active parameters per token (measured)", fmt(measure.get("params_active"))],
        ["MoE MFLOPs per audio second (measured)", fmt(measure.get("moe_mflops_per_audio_s"), 2)],
        ["training seconds", fmt(summary.get("seconds"), 1)], ["steps", fmt(summary.get("steps"))]])]  # fmt: skip
    blocks.append(("h2", "Routing by task"))
    blocks += routing_blocks({"run": [measure]}, plots, by_task=True)
    steps, losses, source = training_curve(run_dir)
    blocks.append(("h2", "Training curve"))
    blocks += curves_block({"run": [(steps, losses)] if steps else []}, plots)
    return write(run_dir, blocks, f"audiomoe run report: {run_dir.name}")
