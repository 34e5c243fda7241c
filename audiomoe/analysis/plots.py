"""Matplotlib plots of a study or a run (Agg backend, no display): each function returns its Figure.

The report saves them as PNG (:func:`save_png`); tests read the axes' titles and labels from the
returned figures. Long config names are wrapped, bars carry seed points and 95% interval whiskers,
heatmaps are annotated with their values so that a printed report is readable without colour.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _wrap(name: str, width: int = 14) -> str:
    return "\n".join(textwrap.wrap(name.replace("+", "+ "), width)) or name


def save_png(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (atomically, parent directories created) and close it."""
    import io

    from audiomoe.core.atomic import write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    finally:
        _plt().close(fig)
    write_bytes(path, buf.getvalue(), what="plot")
    return path


def metric_by_config(
    agg: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], metric: str, title: Optional[str] = None, chance: Optional[float] = None,
    arms: Optional[Sequence[str]] = None,
) -> Any:
    """Bars: ``metric`` mean per config, whiskers the 95% interval over seeds, dots the seeds; coloured by arm (``arms`` fixes the colour order)."""
    plt = _plt()
    names = [a["config"] for a in agg]
    arms = list(arms) if arms is not None else list(dict.fromkeys(a.get("arm", "") for a in agg))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.05 * len(names) + 1.5), 4.2))
    for i, a in enumerate(agg):
        mean, lo, hi = a.get(f"{metric}/mean"), a.get(f"{metric}/ci_low"), a.get(f"{metric}/ci_high")
        color = PALETTE[arms.index(a.get("arm", "")) % len(PALETTE)]
        if mean is None or not math.isfinite(mean):
            ax.text(i, 0, "no data", ha="center", va="bottom", fontsize=8, rotation=90)
            continue
        ax.bar(i, mean, color=color, alpha=0.75, label=a.get("arm") or None)
        if lo is not None and math.isfinite(lo):
            ax.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], color="black", capsize=5, lw=1.2)
        seeds = [r.get(metric) for r in rows if r.get("config") == a["config"] and r.get("status") == "ok"]
        seeds = [s for s in seeds if isinstance(s, (int, float)) and math.isfinite(s)]
        ax.scatter([i] * len(seeds), seeds, color="black", s=14, zorder=3)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    if len(uniq) > 1 or chance is not None:
        ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="best")
    _clip_to_data(ax, agg, rows, metric)
    ax.set_xticks(range(len(names)), [_wrap(n) for n in names], fontsize=8)
    ax.set_xlabel("config")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per config (mean, 95% CI over seeds, dots = seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _clip_to_data(ax: Any, agg: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], metric: str) -> None:
    """Scale the y axis to the means and seed points (a 2-seed t interval is ~13 x the sem and would flatten the bars);
    whiskers past the axis are cut and marked with a caret."""
    names = {a["config"] for a in agg}
    pts = [a.get(f"{metric}/mean") for a in agg] + [r.get(metric) for r in rows if r.get("config") in names and r.get("status") == "ok"]
    pts = [float(v) for v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
    if not pts:
        return
    lo, hi = min(min(pts), 0.0), max(pts)
    span = (hi - lo) or max(abs(hi), 1e-3)
    bottom, top = lo - (0.08 * span if lo < 0 else 0.0), hi + 0.45 * span
    if any(k in metric for k in ("accuracy", "f1", "share", "map")):
        bottom, top = max(bottom, 0.0), min(top, 1.05)
    ax.set_ylim(bottom, top)
    clipped = False
    for i, a in enumerate(agg):
        for key, edge, marker in (("ci_high", top, "^"), ("ci_low", bottom, "v")):
            v = a.get(f"{metric}/{key}")
            if isinstance(v, float) and math.isfinite(v) and ((key == "ci_high" and v > top) or (key == "ci_low" and v < bottom)):
                ax.plot(i, edge, marker=marker, color="black", ms=6, clip_on=False)
                clipped = True
    if clipped:
        ax.annotate("^ / v: interval continues past the axis", xy=(0.99, 0.99), xycoords="axes fraction", ha="right", va="top", fontsize=7, color="#444")


def per_layer(series: Mapping[str, Sequence[float]], layers: Sequence[str], ylabel: str, title: str, kind: str = "line") -> Any:
    """One line (or group of bars) per series over the routed layers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(layers) + 3), 3.8))
    xs = list(range(len(layers)))
    n = max(len(series), 1)
    for j, (name, vals) in enumerate(series.items()):
        color = PALETTE[j % len(PALETTE)]
        if kind == "bar":
            w = 0.8 / n
            ax.bar([x - 0.4 + w * (j + 0.5) for x in xs], vals, width=w, color=color, label=name)
        else:
            ax.plot(xs, vals, marker="o", color=color, label=name)
    ax.set_xticks(xs, [lay.replace("backbone/", "") for lay in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def heatmaps(panels: Mapping[str, Mapping[str, Sequence[float]]], columns: Mapping[str, Sequence[str]], title: str,
             xlabel: str, value: str = "share", normalise: bool = True) -> Any:
    """One annotated heatmap per panel (rows: tasks, columns: experts or weak encoders); rows normalised to shares."""
    plt = _plt()
    names = list(panels)
    width = max(len(columns.get(n, [])) for n in names) if names else 1
    ncols = min(len(names), 3 if width <= 5 else 2) or 1
    nrows = max(1, math.ceil(len(names) / ncols))
    # compact cells with 8-pt numbers: the figure is drawn ~1300 px wide, so a report page shows it near 1:1 and the numbers stay legible
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * max(3.2, 0.52 * width + 1.5), nrows * 2.5 + 0.5), squeeze=False, layout="constrained")
    im = None
    tables = {}
    for name in names:
        rows = []
        for t in panels[name]:
            row = [float(v) for v in panels[name][t]]
            s = sum(row)
            rows.append([v / s for v in row] if normalise and s > 0 else row)
        tables[name] = rows
    vmax = max([0.05] + [v for rows in tables.values() for row in rows for v in row])  # shares of 8+ experts are small: scale to the data
    for i, name in enumerate(names):
        ax = axes[i // ncols][i % ncols]
        tasks = list(panels[name])
        data = tables[name]
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        cols = list(columns.get(name, []))
        ax.set_xticks(range(len(cols)), [c.replace(" ", "\n") for c in cols], fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        for r, row in enumerate(data):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.2f}".replace("0.", ".", 1) if width > 6 else f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 * vmax else "black")  # fmt: skip
        if i >= len(names) - ncols:  # the axis names once, under the bottom row
            ax.set_xlabel(xlabel, fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel("task", fontsize=9)
        ax.set_title(_wrap(name, 40), fontsize=9)
    for j in range(len(names), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=value)
    fig.suptitle(title, fontsize=11)
    return fig


def training_curves(curves: Mapping[str, Sequence[tuple[Sequence[int], Sequence[float]]]], title: str = "training loss per config",
                    groups: Optional[Mapping[str, str]] = None, ylabel: str = "training loss (mean over tasks)", smooth: bool = True) -> Any:
    """Per config: each seed's loss curve (thin) and their mean at shared steps (thick), smoothed; one panel per group (``config -> arm``).

    Each point is the mean over tasks of every task's latest loss (:func:`audiomoe.analysis.results.training_curve`),
    so a batch's task mix does not move it; per-batch losses stay noisy, so every line is a trailing mean over a span of about a tenth of the panel's steps; the
    span is in steps, so a run logged every step and one logged every 12th are smoothed alike.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    panels: dict[str, list[str]] = {}
    for name in curves:
        panels.setdefault((groups or {}).get(name, ""), []).append(name)
    ncols = min(len(panels), 3) or 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 if ncols == 1 else 4.4 * ncols, 4.2 if nrows == 1 else 3.6 * nrows), squeeze=False, sharey=True)
    spans = []
    j = 0
    for i, (group, names) in enumerate(panels.items()):
        ax = axes[i // ncols][i % ncols]
        last = max((max(st) for n in names for st, _ in curves[n] if len(st)), default=1)
        span = max(1, round(last / 10)) if smooth else 1
        spans.append(span)
        for name in names:
            seeds, color = curves[name], PALETTE[j % len(PALETTE)]
            j += 1
            for steps, losses in seeds:
                ax.plot(steps, _smooth_steps(steps, losses, span), color=color, alpha=0.35, lw=0.8)
            common = sorted(set.intersection(*[set(st) for st, _ in seeds])) if seeds else []
            if common:
                mean = [sum(dict(zip(st, lo))[c] for st, lo in seeds) / len(seeds) for c in common]
                ax.plot(common, _smooth_steps(common, mean, span), color=color, lw=2, label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.set_xlabel("optimizer step")
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
        ax.set_title(group or title, fontsize=10)
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=8, loc="upper right")
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    how = f"trailing mean over {spans[0]} steps" if len(set(spans)) == 1 else "trailing mean over a tenth of each panel's steps"
    lines = "smoothed" if sum(len(v) for v in curves.values()) == 1 else "thin: seeds, thick: their mean"  # one run: no seeds to explain
    if not smooth:  # each point is one evaluation: nothing was averaged over steps
        how = "one point per evaluation"
        lines = "one run" if sum(len(v) for v in curves.values()) == 1 else "thin: seeds, thick: their mean"
    if groups:
        fig.suptitle(f"{title} ({lines}; {how})", fontsize=11)
    elif spans and spans[0] > 1:
        axes[0][0].set_title(f"{title}\n({lines}; {how})", fontsize=10)
    fig.tight_layout()
    return fig


def _smooth_steps(steps: Sequence[int], values: Sequence[float], span: int) -> list[float]:
    """Trailing mean of ``values`` over the points whose step lies in ``(step - span, step]`` (``span`` 1: the values as they are)."""
    out, lo, acc = [], 0, 0.0
    for i, (st, v) in enumerate(zip(steps, values)):
        acc += v
        while steps[lo] <= st - span:
            acc -= values[lo]
            lo += 1
        out.append(acc / (i - lo + 1))
    return out


def _task_panels(measures: Mapping[str, Sequence[Mapping[str, Any]]], layers: Sequence[str], key: str, prefix: str,
                 by_task: bool, mean: bool) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Per layer (and config), each task's per-column ``key`` summed over seeds (``mean``: averaged), with the column labels."""
    panels: dict[str, Any] = {}
    cols: dict[str, Any] = {}
    for cfg, ms in measures.items():
        for lay in layers:
            rs = [m["routing"][lay] for m in ms if lay in m["routing"]]
            if not rs:
                continue
            n = rs[0]["columns"]
            name = lay.replace(prefix, "") if by_task else f"{cfg} {lay.replace(prefix, '')}"
            tasks = sorted({t for r in rs for t in r[key]})
            total = lambda t, c: sum(r[key].get(t, [0] * n)[c] for r in rs)  # noqa: E731
            panels[name] = {t: [total(t, c) / len(rs) if mean else total(t, c) for c in range(n)] for t in tasks}
            cols[name] = rs[0]["column_labels"]
    return panels, cols


def routing_figures(measures: Mapping[str, Sequence[Mapping[str, Any]]], by_task: bool = False) -> dict[str, Any]:
    """The routing plots of several configs' ``measure.json`` (seeds averaged), or of one run per task (``by_task``).

    Keys: ``experts_per_layer``, ``null_share``, ``expert_load``, ``weak_selection``; a plot is left out
    when no run has its kind of layer (no MoE layer, no MoWE router).
    """
    token_layers = list(dict.fromkeys(n for ms in measures.values() for m in ms for n, r in m["routing"].items() if r["kind"] == "token"))
    sample_layers = list(dict.fromkeys(n for ms in measures.values() for m in ms for n, r in m["routing"].items() if r["kind"] == "sample"))
    figs: dict[str, Any] = {}

    def mean_over(ms: Sequence[Mapping[str, Any]], layer: str, key: str, task: Optional[str] = None) -> float:
        vals = []
        for m in ms:
            r = m["routing"].get(layer)
            if r is not None:
                vals.append(r[f"{key}_by_task"].get(task, math.nan) if task else r[key])
        return sum(vals) / len(vals) if vals else math.nan

    if token_layers:
        for key, ylabel, title, fkey in (
            ("real_experts_per_token", "routed experts per token (null excluded)", "experts per token per layer", "experts_per_layer"),
            ("null_share", "null-expert share of picks", "null-expert share per layer", "null_share"),
        ):
            if fkey == "null_share" and not any(r.get("null_columns") for ms in measures.values() for m in ms for r in m["routing"].values()):
                continue  # no null experts anywhere: an all-zero plot says nothing
            series = {}
            for cfg, ms in measures.items():
                if not any(lay in m["routing"] for m in ms for lay in token_layers):
                    continue  # a model without MoE layers (e.g. a MoWE encoder only): no line
                tasks = sorted({t for m in ms for r in m["routing"].values() for t in r.get(f"{key}_by_task", {})}) if by_task else [None]
                for t in tasks:
                    series[t if by_task else cfg] = [mean_over(ms, lay, key, t) for lay in token_layers]
            figs[fkey] = per_layer(series, token_layers, ylabel, title + (" by task" if by_task else " (mean over seeds)"),
                                   kind="bar" if fkey == "null_share" else "line")  # fmt: skip
        panels, cols = _task_panels(measures, token_layers, "load_by_task", "backbone/", by_task, mean=False)
        has_null = any("null" in str(c) for cs in cols.values() for c in cs)
        figs["expert_load"] = heatmaps(panels, cols, "expert load per task (share of each task's picks)",
                                       "expert (null = computation skipped)" if has_null else "expert")  # fmt: skip
    if sample_layers:
        panels, cols = _task_panels(measures, sample_layers, "selection_by_task", "encoder/", by_task, mean=True)
        figs["weak_selection"] = heatmaps(panels, cols, "weak-encoder selection per task (share of samples)", "weak encoder",
                                          value="share of samples", normalise=False)  # fmt: skip
    return figs
