"""The routing plots of a study or a run: experts per token and null share per layer, expert load and MoWE
weak-encoder selection per task as annotated heatmaps (:func:`routing_figures` builds them from ``measure.json``).

Shares the Agg backend, palette and label wrapping of :mod:`audiomoe.analysis.plots`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from audiomoe.analysis.plots import PALETTE, pyplot, wrap_label


def per_layer(
    series: Mapping[str, Sequence[float]], layers: Sequence[str], ylabel: str, title: str, kind: str = "line"
) -> Any:
    """One line (or group of bars) per series over the routed layers."""
    plt = pyplot()
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


def heatmaps(
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    columns: Mapping[str, Sequence[str]],
    title: str,
    xlabel: str,
    value: str = "share",
    normalise: bool = True,
) -> Any:
    """One annotated heatmap per panel (rows: tasks, columns: experts or weak encoders); rows normalised to shares."""
    plt = pyplot()
    names = list(panels)
    width = max(len(columns.get(n, [])) for n in names) if names else 1
    ncols = min(len(names), 3 if width <= 5 else 2) or 1
    nrows = max(1, math.ceil(len(names) / ncols))
    # compact cells with 8-pt numbers: the figure is drawn ~1300 px wide, so a report page shows it near 1:1 and the numbers stay legible
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(ncols * max(3.2, 0.52 * width + 1.5), nrows * 2.5 + 0.5),
        squeeze=False,
        layout="constrained",
    )
    im = None
    tables = {}
    for name in names:
        rows = []
        for t in panels[name]:
            row = [float(v) for v in panels[name][t]]
            s = sum(row)
            rows.append([v / s for v in row] if normalise and s > 0 else row)
        tables[name] = rows
    vmax = max(
        [0.05] + [v for rows in tables.values() for row in rows for v in row]
    )  # shares of 8+ experts are small: scale to the data
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
                ax.text(
                    c,
                    r,
                    f"{v:.2f}".replace("0.", ".", 1) if width > 6 else f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v < 0.6 * vmax else "black",
                )
        if i >= len(names) - ncols:  # the axis names once, under the bottom row
            ax.set_xlabel(xlabel, fontsize=9)
        if i % ncols == 0:
            ax.set_ylabel("task", fontsize=9)
        ax.set_title(wrap_label(name, 40), fontsize=9)
    for j in range(len(names), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=value)
    fig.suptitle(title, fontsize=11)
    return fig


def _task_panels(
    measures: Mapping[str, Sequence[Mapping[str, Any]]],
    layers: Sequence[str],
    key: str,
    prefix: str,
    by_task: bool,
    mean: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
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

            def total(t: str, c: int, rs: list = rs, n: int = n) -> float:
                return sum(r[key].get(t, [0] * n)[c] for r in rs)

            panels[name] = {t: [total(t, c) / len(rs) if mean else total(t, c) for c in range(n)] for t in tasks}
            cols[name] = rs[0]["column_labels"]
    return panels, cols


def routing_figures(measures: Mapping[str, Sequence[Mapping[str, Any]]], by_task: bool = False) -> dict[str, Any]:
    """The routing plots of several configs' ``measure.json`` (seeds averaged), or of one run per task (``by_task``).

    Keys: ``experts_per_layer``, ``null_share``, ``expert_load``, ``weak_selection``; a plot is left out
    when no run has its kind of layer (no MoE layer, no MoWE router).
    """
    token_layers = list(
        dict.fromkeys(
            n for ms in measures.values() for m in ms for n, r in m["routing"].items() if r["kind"] == "token"
        )
    )
    sample_layers = list(
        dict.fromkeys(
            n for ms in measures.values() for m in ms for n, r in m["routing"].items() if r["kind"] == "sample"
        )
    )
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
            (
                "real_experts_per_token",
                "routed experts per token (null excluded)",
                "experts per token per layer",
                "experts_per_layer",
            ),
            ("null_share", "null-expert share of picks", "null-expert share per layer", "null_share"),
        ):
            if fkey == "null_share" and not any(
                r.get("null_columns") for ms in measures.values() for m in ms for r in m["routing"].values()
            ):
                continue  # no null experts anywhere: an all-zero plot says nothing
            series = {}
            for cfg, ms in measures.items():
                if not any(lay in m["routing"] for m in ms for lay in token_layers):
                    continue  # a model without MoE layers (e.g. a MoWE encoder only): no line
                tasks = (
                    sorted({t for m in ms for r in m["routing"].values() for t in r.get(f"{key}_by_task", {})})
                    if by_task
                    else [None]
                )
                for t in tasks:
                    series[t if by_task else cfg] = [mean_over(ms, lay, key, t) for lay in token_layers]
            figs[fkey] = per_layer(
                series,
                token_layers,
                ylabel,
                title + (" by task" if by_task else " (mean over seeds)"),
                kind="bar" if fkey == "null_share" else "line",
            )
        panels, cols = _task_panels(measures, token_layers, "load_by_task", "backbone/", by_task, mean=False)
        has_null = any("null" in str(c) for cs in cols.values() for c in cs)
        figs["expert_load"] = heatmaps(
            panels,
            cols,
            "expert load per task (share of each task's picks)",
            "expert (null = computation skipped)" if has_null else "expert",
        )
    if sample_layers:
        panels, cols = _task_panels(measures, sample_layers, "selection_by_task", "encoder/", by_task, mean=True)
        figs["weak_selection"] = heatmaps(
            panels,
            cols,
            "weak-encoder selection per task (share of samples)",
            "weak encoder",
            value="share of samples",
            normalise=False,
        )
    return figs
