"""Analysis: ablations (grids x seeds, each run a subprocess), statistics over seeds, routing health, plots, reports.

Command line: ``audiomoe ablate``, ``audiomoe report``, ``audiomoe demo`` (:mod:`audiomoe.analysis.cli`).
From Python (names load on first use; nothing here imports torch or matplotlib until used)::

    from audiomoe.analysis import expand, parse_grid, run_ablation, Plan, summarize, paired_test
    configs = expand("tiny-corpus", [parse_grid("backbone.moe.router=top_k,top_p")], steps=100)
    result = run_ablation(Plan(configs, [0, 1], {"": configs[0].name}), "ablations/x", title="routers", jobs=2)
    summarize([0.51, 0.55, 0.53]).text()          # '0.530 ± 0.020 [0.480, 0.580] (n=3)'

Modules: ``stats`` (mean, std, t intervals, paired tests), ``grid`` (grid / variant expansion),
``study`` (study files, the built-in ``papers`` study), ``launch`` (local pool / submitit),
``measure`` + ``routing_stats`` (per-run eval pass: routing, active parameters, MoE FLOPs),
``results`` (tables), ``claims`` (paper claims in plain words), ``plots`` + ``routing_plots``, ``report`` (+ ``report_blocks``, ``report_html``), ``ablate``.
"""

from __future__ import annotations

from audiomoe.core.lazy import lazy_getattr

_LAZY = {
    "Summary": "audiomoe.analysis.stats",
    "PairedTest": "audiomoe.analysis.stats",
    "summarize": "audiomoe.analysis.stats",
    "paired_test": "audiomoe.analysis.stats",
    "aggregate": "audiomoe.analysis.stats",
    "compare": "audiomoe.analysis.stats",
    "Config": "audiomoe.analysis.grid",
    "Run": "audiomoe.analysis.grid",
    "Plan": "audiomoe.analysis.grid",
    "expand": "audiomoe.analysis.grid",
    "parse_grid": "audiomoe.analysis.grid",
    "parse_variant": "audiomoe.analysis.grid",
    "load_study": "audiomoe.analysis.study",
    "plan_study": "audiomoe.analysis.study",
    "launch": "audiomoe.analysis.launch",
    "execute_run": "audiomoe.analysis.launch",
    "measure_model": "audiomoe.analysis.routing_stats",
    "measure_run": "audiomoe.analysis.measure",
    "collect": "audiomoe.analysis.results",
    "run_ablation": "audiomoe.analysis.ablate",
    "rerender": "audiomoe.analysis.ablate",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY, globals())
