"""The ``ablate``, ``report`` and ``demo`` commands; :func:`register` adds them to the ``audiomoe`` parser.

Nothing here imports torch or matplotlib at parse time: ``audiomoe --help`` stays fast. The sweep's
own process trains nothing (training and measurement run in subprocesses); it composes each config on
torch's meta device once, before the first run, to refuse a bad one; the report's plots import matplotlib.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from audiomoe.core.argtypes import float_in, int_in
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.limits import MAX_STEPS

ABLATE_DESCRIPTION = """Train every combination of --grid values (x --variant) at --seeds seeds, each run its own
subprocess and directory (OUT/runs/<config>/seed-<n>), then write results.csv / results.jsonl,
aggregate.csv (mean, std, 95% CI per config), comparisons.csv (paired tests against --baseline),
routing plots and report.md / report.html into OUT. Rerunning skips finished runs; a failed run is
reported (its log tail in failed.json) and the others go on.

TARGET is a preset, a model YAML, a recipe, or a study file (the built-in 'papers', or a YAML with
'arms:'); a study brings its own configs, so --grid / --variant / --set go with a preset or YAML."""

ABLATE_EPILOG = """examples:
  audiomoe ablate tiny-corpus --grid backbone.moe.router=top_k,top_p --seeds 3 --jobs 2
  audiomoe ablate tiny-unimoe --grid backbone.moe.router.p=0.5,0.7,0.9 --seeds 2 --steps 100
  audiomoe ablate tiny-corpus --variant topk=backbone.moe.router=top_k --variant topp='backbone.moe.router=top_p;backbone.moe.num_null=1' --baseline topk
  audiomoe ablate papers --jobs 2                  the built-in study (audiomoe/analysis/studies/papers.yaml)
  audiomoe report ablations/papers                 redo tables and plots of a study directory"""


def _kv(items: list[str], flag: str) -> dict[str, Any]:
    from audiomoe.core.overrides import parse_override

    out = {}
    for text in items:
        if "=" not in text:
            raise AudioMoEError(f"{flag} '{text}' must be KEY=VALUE")
        k, v = parse_override(text)
        out[k] = v
    return out


def _default_out(name: str) -> str:
    return os.path.join("ablations", Path(name).stem if name.endswith((".yaml", ".yml")) else name.replace(":", "_"))


def _finish(result: dict[str, Any], stream: Any = sys.stdout) -> int:
    from audiomoe.analysis.ablate import print_claims

    if result["claims"]:
        print("\nclaims:", file=stream)
        print_claims(result["claims"], stream)
    print(f"\nreport: {result['report_html']}\n        {result['report_md']}", file=stream)
    print(f"tables: {result['root'] / 'results.csv'}, {result['root'] / 'aggregate.csv'}", file=stream)
    if result.get("failed"):
        print(
            f"{result['failed']} run(s) failed; see failed.json in their directories (rerun the same command to retry only those)",
            file=sys.stderr,
        )
        return 1
    return 0


def _plan_from_args(args: argparse.Namespace) -> tuple[Any, str, str, list]:
    """(plan, title, description, claims) from the ablate arguments."""
    from audiomoe.analysis.grid import Plan, expand, parse_grid, parse_variant
    from audiomoe.analysis.study import find_study, load_study, plan_study

    study_path = find_study(args.target)
    if study_path is not None:
        extra = [
            f
            for f, v in (
                ("--grid", args.grid),
                ("--variant", args.variant),
                ("--set", args.set),
                ("--baseline", args.baseline),
                ("--train", args.train),
            )
            if v
        ]
        if extra:
            raise AudioMoEError(
                f"'{args.target}' is a study file: it names its own configs; {', '.join(extra)} go with a preset or model YAML (edit a copy of {study_path} instead)"
            )
        spec = load_study(study_path)
        plan = plan_study(spec, args.out, compact=args.compact, seeds=args.seeds, steps=args.steps)
        if args.measure_batches:
            plan.measure_batches = args.measure_batches
        return plan, f"Study '{spec.study}'" + (" (compact)" if args.compact else ""), spec.description, spec.claims
    if args.compact:
        raise AudioMoEError("--compact applies to study files only (e.g. audiomoe ablate papers --compact)")
    grids = [parse_grid(g) for g in args.grid]
    variants = [parse_variant(v) for v in args.variant]
    from audiomoe.analysis.study import recipe_exists

    steps = args.steps or (
        None if recipe_exists(args.target) else 200
    )  # a recipe's stages decide its steps unless --steps
    configs = expand(
        args.target, grids, variants, overrides=args.set, train=_kv(args.train, "--train"), steps=steps, arm="ablation"
    )
    names = [c.name for c in configs]
    baseline = args.baseline or names[0]
    if baseline not in names:
        from audiomoe.core.errors import did_you_mean

        raise AudioMoEError(
            f"--baseline '{baseline}' is not one of the configs ({', '.join(names)}).{did_you_mean(baseline, names)}"
        )
    plan = Plan(
        configs,
        list(range(args.seeds or 3)),
        {"ablation": baseline},
        {},
        args.metric or "mean/accuracy",
        args.measure_batches or 4,
    )
    title = f"Ablation of {args.target}: " + (
        ", ".join(k for k, _ in grids) or ", ".join(n for n, _ in variants) or "seeds only"
    )
    return plan, title, "", []


def cmd_ablate(args: argparse.Namespace) -> int:
    """``audiomoe ablate``: plan, run (resumable), tables, claims, report."""
    from audiomoe.analysis.ablate import run_ablation

    if args.seeds is not None and args.seeds < 1:
        raise AudioMoEError(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        raise AudioMoEError(f"--steps must be >= 1, got {args.steps}")
    args.out = args.out or _default_out(args.target)
    plan, title, description, claims = _plan_from_args(args)
    if args.metric:
        plan.metric = args.metric
    result = run_ablation(
        plan,
        args.out,
        title=title,
        description=description,
        claims=claims,
        jobs=args.jobs,
        launcher=args.launcher,
        timeout=args.timeout,
        submitit_cluster=args.submitit_cluster,
        submitit_options=_kv(args.submitit_opt, "--submitit-opt"),
    )
    return _finish(result)


def cmd_report(args: argparse.Namespace) -> int:
    """``audiomoe report DIR``: a study directory (tables and plots again) or one run (routing from its checkpoint)."""
    from audiomoe.analysis.ablate import PLAN_FILE, rerender

    root = Path(args.dir)
    if not root.is_dir():
        raise AudioMoEError(
            f"'{root}' is not a directory; give a study directory (audiomoe ablate --out) or a run directory (audiomoe train --out)"
        )
    if (root / PLAN_FILE).is_file():
        return _finish(rerender(root))
    from audiomoe.analysis.measure import MEASURE_FILE, measure_is_current, measure_run, read_summary
    from audiomoe.analysis.report import run_report
    from audiomoe.analysis.results import read_json

    summary = read_summary(root)
    measure = None if (args.remeasure or args.checkpoint or args.data) else read_json(root / MEASURE_FILE)
    if measure is not None and not measure_is_current(measure, summary):  # an older version's, or before a resume
        measure = None
    if measure is None:
        print(f"measuring routing on {args.batches} held-out batches ...", file=sys.stderr)
        measure = measure_run(root, args.batches, args.checkpoint, args.data)
        if measure.get("batches") != args.batches:
            print(
                f"the held-out split gave {measure.get('batches')} batch(es) ({measure.get('items')} items), fewer than {args.batches}",
                file=sys.stderr,
            )
    md, page = run_report(root, measure, summary)
    print(f"report: {page}\n        {md}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``audiomoe demo``: the built-in corpus (made if missing), then the compact papers study; prints where the report is."""
    import time

    from audiomoe.analysis.ablate import run_ablation
    from audiomoe.analysis.study import STUDIES, load_study, plan_study

    t0 = time.perf_counter()
    from audiomoe.data import builtin_corpus

    print(f"corpus: {builtin_corpus(progress=True)}", flush=True)
    spec = load_study(STUDIES / "papers.yaml")
    plan = plan_study(spec, args.out, compact=True)
    result = run_ablation(
        plan,
        args.out,
        title="audiomoe demo: the papers study, compact",
        description=spec.description,
        claims=spec.claims,
        jobs=args.jobs,
        launcher="local",
    )
    code = _finish(result)
    print(f"demo finished in {(time.perf_counter() - t0) / 60:.1f} min")
    return code


def register(subparsers: Any) -> None:
    """Add ``ablate``, ``report`` and ``demo`` to the ``audiomoe`` subcommand parsers."""
    p = subparsers.add_parser(
        "ablate",
        help="grid x seeds of training runs -> tables with 95%% CIs, paired tests, routing plots, a report",
        description=ABLATE_DESCRIPTION,
        epilog=ABLATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="TARGET", help="preset, model YAML, recipe, or study ('papers' or a study YAML)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values of one --set key (a component name swaps the component; repeatable: the product is run)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=K=V;K=V",
        help="a named bundle of overrides (repeatable; crossed with the grid)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override every config gets (repeatable)"
    )
    p.add_argument(
        "--baseline", default=None, metavar="NAME", help="config the others are compared with (default: the first)"
    )
    p.add_argument(
        "--seeds", type=int_in(1, 1000), default=None, metavar="N", help="seeds 0..N-1 per config [3; a study: its own]"
    )
    p.add_argument(
        "--steps",
        type=int_in(1, MAX_STEPS),
        default=None,
        metavar="N",
        help="training steps per run [200; a study: its own]",
    )
    p.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an audiomoe train option for every run, e.g. lr=0.01, batch_size=8, data=builtin",
    )
    p.add_argument(
        "--metric", default=None, metavar="NAME", help="key metric of tables and plots [mean/accuracy: mean over tasks]"
    )
    p.add_argument(
        "--measure-batches",
        type=int_in(1, 1000),
        default=None,
        metavar="N",
        help="held-out batches of each run's routing pass [4]",
    )
    p.add_argument(
        "--jobs", type=int_in(1, 1024), default=1, metavar="J", help="runs at once (threads per run = cores / J) [1]"
    )
    p.add_argument(
        "--launcher",
        choices=["local", "submitit"],
        default="local",
        help="local process pool, or one submitit job per run (SLURM, else local) [local]",
    )
    p.add_argument(
        "--submitit-cluster",
        choices=["slurm", "local", "debug"],
        default=None,
        help="force a submitit executor (default: SLURM if available)",
    )
    p.add_argument(
        "--submitit-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="submitit parameter, e.g. slurm_partition=gpu, timeout_min=120, gpus_per_node=1",
    )
    p.add_argument(
        "--timeout",
        type=float_in(0.0, lo_open=True),
        default=None,
        metavar="S",
        help="kill a run (train or measure) after S seconds and report it failed",
    )
    p.add_argument(
        "--compact", action="store_true", help="a study's compact form (fewer steps and seeds: what audiomoe demo runs)"
    )
    p.add_argument("--out", default=None, metavar="DIR", help="study directory [ablations/<TARGET>]")
    p.set_defaults(func=cmd_ablate)

    p = subparsers.add_parser(
        "report", help="tables and routing plots of a study directory, or of one run from its checkpoint"
    )
    p.add_argument(
        "dir", metavar="DIR", help="a study directory (audiomoe ablate --out) or a run directory (audiomoe train --out)"
    )
    p.add_argument(
        "--batches",
        type=int_in(1, 1000),
        default=4,
        metavar="N",
        help="held-out batches of the routing pass (one run) [4]",
    )
    p.add_argument(
        "--checkpoint", default=None, metavar="PATH", help="measure this checkpoint instead of the run's last"
    )
    p.add_argument(
        "--data", default=None, metavar="DATA", help="held-out data instead of the run's: builtin, tones or a manifest"
    )
    p.add_argument("--remeasure", action="store_true", help="measure again even if measure.json exists")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser(
        "demo",
        help="make the built-in corpus if missing, run the compact papers study (< 10 min on 2 cores), print the report path",
    )
    p.add_argument(
        "--out", default=os.path.join("ablations", "demo"), metavar="DIR", help="study directory [ablations/demo]"
    )
    p.add_argument(
        "--jobs",
        type=int_in(1, 1024),
        default=max(1, min(os.cpu_count() or 1, 4)),
        metavar="J",
        help="runs at once [cores, at most 4]",
    )
    p.set_defaults(func=cmd_demo)
