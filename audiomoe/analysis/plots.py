"""Matplotlib plots of a study or a run (Agg backend, no display): each function returns its Figure.

The report saves them as PNG (:func:`save_png`); tests read the axes' titles and labels from the
returned figures. Long config names are wrapped, bars carry seed points and 95% interval whiskers,
heatmaps are annotated with their values so that a printed report is readable without colour.
Here: the metric bars and the training curves; the routing plots are in :mod:`audiomoe.analysis.routing_plots`.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only: no display is needed or opened)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def wrap_label(name: str, width: int = 14) -> str:
    """``name`` wrapped to lines of ``width`` characters (after each ``+``), so long config names fit under a bar."""
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
        pyplot().close(fig)
    write_bytes(path, buf.getvalue(), what="plot")
    return path


def metric_by_config(
    agg: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    title: Optional[str] = None,
    chance: Optional[float] = None,
    arms: Optional[Sequence[str]] = None,
) -> Any:
    """Bars: ``metric`` mean per config, whiskers the 95% interval over seeds, dots the seeds; coloured by arm (``arms`` fixes the colour order)."""
    plt = pyplot()
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
    ax.set_xticks(range(len(names)), [wrap_label(n) for n in names], fontsize=8)
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
    pts = [a.get(f"{metric}/mean") for a in agg] + [
        r.get(metric) for r in rows if r.get("config") in names and r.get("status") == "ok"
    ]
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
            if (
                isinstance(v, float)
                and math.isfinite(v)
                and ((key == "ci_high" and v > top) or (key == "ci_low" and v < bottom))
            ):
                ax.plot(i, edge, marker=marker, color="black", ms=6, clip_on=False)
                clipped = True
    if clipped:
        ax.annotate(
            "^ / v: interval continues past the axis",
            xy=(0.99, 0.99),
            xycoords="axes fraction",
            ha="right",
            va="top",
            fontsize=7,
            color="#444",
        )


def training_curves(
    curves: Mapping[str, Sequence[tuple[Sequence[int], Sequence[float]]]],
    title: str = "training loss per config",
    groups: Optional[Mapping[str, str]] = None,
    ylabel: str = "training loss (mean over tasks)",
    smooth: bool = True,
) -> Any:
    """Per config: each seed's loss curve (thin) and their mean at shared steps (thick), smoothed; one panel per group (``config -> arm``).

    Each point is the mean over tasks of every task's latest loss (:func:`audiomoe.analysis.results.training_curve`),
    so a batch's task mix does not move it; per-batch losses stay noisy, so every line is a trailing mean over a span of about a tenth of the panel's steps; the
    span is in steps, so a run logged every step and one logged every 12th are smoothed alike.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    panels: dict[str, list[str]] = {}
    for name in curves:
        panels.setdefault((groups or {}).get(name, ""), []).append(name)
    ncols = min(len(panels), 3) or 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(7.5 if ncols == 1 else 4.4 * ncols, 4.2 if nrows == 1 else 3.6 * nrows),
        squeeze=False,
        sharey=True,
    )
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
    how = (
        f"trailing mean over {spans[0]} steps"
        if len(set(spans)) == 1
        else "trailing mean over a tenth of each panel's steps"
    )
    lines = (
        "smoothed" if sum(len(v) for v in curves.values()) == 1 else "thin: seeds, thick: their mean"
    )  # one run: no seeds to explain
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
