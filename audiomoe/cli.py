"""The ``audiomoe`` command line.

``--help``, ``list`` and ``plugins`` never import torch, so they answer in a fraction of a second
even with many plugins installed; ``describe``, ``validate`` and ``compose`` import the
components they touch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

from audiomoe.core.argtypes import int_in
from audiomoe.core.errors import AudioMoEError

EPILOG = """examples:
  audiomoe list router                      routers from every installed plugin
  audiomoe describe router/top_k            params with types, defaults, limits, an example
  audiomoe validate my.yaml --set backbone.moe.router.k=1
  audiomoe compose tiny-moe-cls --set backbone.moe.router=top_k --set backbone.moe.num_experts=8
  audiomoe train tiny-moe-cls --steps 200 --out runs/tiny
"""


DEBUG_ENV = "AUDIOMOE_DEBUG"


def _registry() -> Any:
    from audiomoe.core.registry import get_registry

    return get_registry()


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    """Print loaded, failed and disabled plugins with versions (in strict mode too: this is where failures are read)."""
    from audiomoe.core.registry import Registry

    reg = Registry(strict=False)
    records = sorted(reg.plugins.values(), key=lambda r: r.name)
    if args.json:
        print(json.dumps([r.__dict__ for r in records], indent=2))
        return 0
    rows = [
        [r.name, r.dist, r.version or "-", r.status, str(r.components), str(r.presets), r.error or r.source]
        for r in records
    ]
    print(_table(rows, ["plugin", "distribution", "version", "status", "components", "presets", "source / error"]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List components of one kind, of the kinds a glob matches (``'*'``: every kind, presets too) or presets."""
    import fnmatch

    from audiomoe.core.registry import RESERVED_KINDS

    reg = _registry()
    kind = args.kind
    # A kind glob ('*', 'pre*') searches presets too: they are what `describe preset/NAME` shows.
    with_presets = kind is not None and any(fnmatch.fnmatchcase(r, kind) for r in RESERVED_KINDS)
    entries = [] if kind in RESERVED_KINDS else reg.list_components(kind, args.pattern)
    presets = reg.list_presets(args.pattern) if with_presets else []
    if args.json:
        rows_json = [e.__dict__ for e in entries] + [{"kind": "preset", **p.__dict__} for p in presets]
        print(json.dumps(rows_json, indent=2, default=str))
        return 0
    pnames = [p.name for p in presets]
    if kind in RESERVED_KINDS:
        rows = [[f"{p.plugin}:{p.name}" if pnames.count(p.name) > 1 else p.name, p.plugin, p.summary] for p in presets]
        print(_table(rows, ["preset", "plugin", "summary"]))
        return 0
    keys = [(e.kind, e.name) for e in entries]
    rows = [
        [e.kind, e.qualified_name if keys.count((e.kind, e.name)) > 1 else e.name, e.plugin, e.summary] for e in entries
    ]
    rows += [
        ["preset", f"{p.plugin}:{p.name}" if pnames.count(p.name) > 1 else p.name, p.plugin, p.summary] for p in presets
    ]
    print(_table(rows, ["kind", "name", "plugin", "summary"]))
    if not rows:
        print(f"(nothing matches {args.pattern!r}; `audiomoe list '*'` lists every kind)")
    if kind is None and args.pattern == "*":
        print(f"\npresets: {', '.join(p.name for p in reg.list_presets())}  (audiomoe list preset)")
    return 0


def _print_preset(info: dict[str, Any]) -> None:
    import yaml

    print(f"preset/{info['name']}  (plugin {info['plugin']} {info['version']})".replace(" )", ")"))
    print(f"  {info['summary']}\n")
    print("spec:\n" + "\n".join("  " + line for line in yaml.safe_dump(info["spec"], sort_keys=False).splitlines()))
    name = info["use_as"]
    print(f"\nuse it: audiomoe compose {name} [--set KEY=VALUE]; every default filled in: audiomoe validate {name}")


def cmd_describe(args: argparse.Namespace) -> int:
    """Describe ``KIND/NAME``: params with types, defaults, limits, descriptions, and an example; or ``preset/NAME``."""
    from audiomoe.core.describe import describe

    kind, sep, name = args.component.partition("/")
    if not sep or not name:
        raise AudioMoEError(f"describe takes KIND/NAME (e.g. router/top_k, preset/tiny-cls), got '{args.component}'")
    info = describe(kind, name)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    if info["kind"] == "preset":
        _print_preset(info)
        return 0
    print(f"{info['kind']}/{info['name']}  (plugin {info['plugin']} {info['version']}, {info['target']})")
    print(f"  {info['summary']}\n")
    if info["doc"]:
        print("\n".join("  " + line for line in info["doc"].splitlines()) + "\n")
    rows = [
        [p["name"], p["type"], json.dumps(p["default"], default=str), ", ".join(p["limits"]) or "-", p["description"]]
        for p in info["params"]
    ]
    print(_table(rows, ["param", "type", "default", "limits", "description"]) if rows else "  (no params)")
    if info["injected"]:
        print(f"\ninjected by the composer (not params): {', '.join(info['injected'])}")
    if info.get("grouped"):
        print(f"grouped form: {info['grouped']}")
    for problem in info.get("problems", []):
        print(f"problem: {problem}")
    print("\nexample:\n" + "\n".join("  " + line for line in info["example"].splitlines()))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a config (preset, YAML path) with overrides; print the resolved spec."""
    import yaml

    from audiomoe.core.composer import validate

    resolved, n_params = validate(args.config, args.set)  # every constructor check, on the meta device
    print(yaml.safe_dump(resolved.to_dict(), sort_keys=False).rstrip())
    print(f"\nOK: {args.config} is valid and composes ({n_params:,} parameters)", file=sys.stderr)
    return 0


def _parts(model: Any) -> list[list[str]]:
    rows = []
    for path, module in model.named_modules():
        info = getattr(module, "audiomoe_component", None)
        if info is None:
            continue
        n = sum(p.numel() for p in module.parameters())
        rows.append([path or "<model>", f"{info.kind}/{info.name}", f"{info.plugin} {info.version}".strip(), f"{n:,}"])
    return rows


def cmd_compose(args: argparse.Namespace) -> int:
    """Build a model; print its parts, where each came from, and total/active parameters."""
    from audiomoe.core.composer import compose, count_parameters

    if args.save_spec:
        _check_writable_file(args.save_spec, "--save-spec", inputs=[args.preset])  # before the build, not after it
    model = compose(args.preset, args.set)
    rows = _parts(model)
    seen: set[str] = set()
    uniq = []
    for r in rows:  # one line per distinct part path prefix is noisy for 32 experts: collapse repeats
        key = r[1] + "|" + ".".join(p for p in r[0].split(".") if not p.isdigit())
        if key in seen:
            continue
        seen.add(key)
        uniq.append(r)
    print(_table(uniq, ["part", "component", "plugin", "parameters"]))
    note = ""
    if not args.no_probe and any(callable(getattr(m, "num_active_parameters", None)) for m in model.modules()):
        model.probe()  # top-p picks and weak-encoder selections vary per input: count what a forward used
        note = "  (routed picks measured on 2 noise clips; --no-probe for the static count)"
    total, active = count_parameters(model)
    print(f"\nparameters: total {total:,}  active per token {active:,.0f} ({active / max(total, 1):.1%}){note}")
    if args.save_spec:
        import yaml

        _write_text(args.save_spec, yaml.safe_dump(model.spec, sort_keys=False), "--save-spec")
        print(f"resolved spec written to {args.save_spec}")
    return 0


def cmd_bench_moe(args: argparse.Namespace) -> int:
    """Time every dispatch plan on the model's MoE layer shapes; print them and write the fastest as a plan table."""
    import torch

    from audiomoe.core.composer import compose
    from audiomoe.moe.tune import tune_plans

    if args.device == "cuda" and not torch.cuda.is_available():
        raise AudioMoEError("--device cuda: no CUDA device is visible here; use --device cpu")
    if args.tune:
        _check_writable_file(args.tune, "--tune")
    model = compose(args.model, args.set)
    dtype = getattr(torch, args.dtype)
    print(f"timing dispatch plans fwd+bwd on {args.tokens} tokens, {args.device} {args.dtype}, median of {args.reps}")
    table, rows = tune_plans(
        model, args.tokens, args.device, dtype, args.reps, progress=lambda s: print("  " + s, flush=True)
    )
    loop = {r.key: r.seconds for r in rows if r.plan == "loop"}
    out = [
        [
            r.key,
            r.plan + (" *" if table.get(r.key) == r.plan else ""),
            "-" if r.seconds is None else f"{r.seconds * 1e3:.2f}",
            "-" if r.seconds is None or not loop.get(r.key) else f"{r.seconds / loop[r.key]:.2f}x",
            f"{r.max_diff:.1e}" if r.seconds is not None else "-",
            r.note,
        ]
        for r in rows
    ]
    print("\n" + _table(out, ["layer shape", "plan (* fastest)", "fwd+bwd ms", "vs loop", "max |diff|", "note"]))
    if args.tune:
        _write_text(args.tune, json.dumps(table, indent=2, sort_keys=True), "--tune")
        print(
            f"\nplan table ({len(table)} shapes) written to {args.tune}; use it with --set backbone.moe.plan_table={os.path.abspath(args.tune)}"
        )
    return 0


def _check_writable_file(path: str, flag: str, inputs: Sequence[str] = ()) -> None:
    """Refuse, before the work, an output that is a directory, in a missing folder, or one of ``inputs``."""
    from audiomoe.core.atomic import check_output

    check_output(path, what=flag, inputs=inputs)


def _write_text(path: str, text: str, flag: str) -> None:
    """Write ``text`` to ``path`` atomically (the kit's one writer); errors name the flag."""
    from audiomoe.core.atomic import write_text

    write_text(path, text, what=flag)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="audiomoe",
        description="audiomoe: compose multi-task audio models from plugin components (encoders, routers, experts, heads).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version="audiomoe 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="loaded, failed and disabled plugins, with versions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("list", help="list components: [KIND] [GLOB]; KIND 'preset' lists presets, '*' every kind")
    p.add_argument(
        "kind",
        nargs="?",
        default=None,
        help="encoder, router, expert, head, backbone, preset, ...; a glob: '*' searches every kind and presets",
    )
    p.add_argument("pattern", nargs="?", default="*", help="glob on the name or plugin:name, e.g. '*top*'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "describe", help="params, defaults, limits and an example for KIND/NAME; preset/NAME shows a preset's spec"
    )
    p.add_argument("component", metavar="KIND/NAME", help="e.g. router/top_p, router/builtin:top_p, preset/tiny-unimoe")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_describe)

    for name, func, what in (("validate", cmd_validate, "CONFIG"), ("compose", cmd_compose, "PRESET")):
        p = sub.add_parser(
            name,
            help=f"{'validate a config and print the resolved spec' if name == 'validate' else 'build a model and print its parts and parameter counts'}",
        )
        p.add_argument("config" if name == "validate" else "preset", metavar=what, help="preset name or YAML path")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override, e.g. backbone.moe.router.k=1 (repeatable)",
        )
        if name == "compose":
            p.add_argument("--save-spec", metavar="FILE", help="write the resolved spec as YAML")
            p.add_argument("--no-probe", action="store_true", help="count active parameters without a forward on noise")
        p.set_defaults(func=func)

    p = sub.add_parser(
        "bench", help="measure parts of a model: `bench moe MODEL --tune FILE` picks each MoE layer's dispatch plan"
    )
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)
    q = bench_sub.add_parser(
        "moe", help="time every dispatch plan on the model's MoE layer shapes (fwd+bwd); --tune writes the plan table"
    )
    q.add_argument("model", metavar="PRESET_OR_YAML")
    q.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, as for compose (repeatable)"
    )
    q.add_argument(
        "--tokens",
        type=int_in(1, 2**24),
        default=4096,
        help="tokens per layer call (batch x sequence of your training)",
    )
    q.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    q.add_argument("--reps", type=int_in(1, 1000), default=5, help="timed repetitions per plan (median)")
    q.add_argument(
        "--tune", metavar="FILE", help="write the fastest plan per shape here (JSON; read by backbone.moe.plan_table)"
    )
    q.set_defaults(func=cmd_bench_moe)

    from audiomoe.train.import_release import register as register_import  # import unimoe-audio DIR --out RUN

    register_import(sub)
    from audiomoe.data.cli import register as register_data  # data make, data from-csv (audiomoe/data/cli.py)

    register_data(sub)
    from audiomoe.train.cli import register as register_train  # train, eval (audiomoe/train/cli.py)

    register_train(sub)

    from audiomoe.analysis.cli import register as register_analysis  # ablate, report, demo (audiomoe/analysis)

    register_analysis(sub)
    return parser


def _one_line_warnings() -> None:
    """audiomoe's own warnings print as their one-line message (not Python's file:line header and source line)."""
    import warnings

    default = warnings.showwarning

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Optional[str] = None
    ) -> None:
        if str(message).startswith("audiomoe"):
            print(str(message), file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``audiomoe`` console script."""
    _one_line_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `audiomoe describe ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        code, line = error_report(args.command, exc)
        if code == 1 and os.environ.get(DEBUG_ENV):
            raise
        print(line, file=sys.stderr)
        return code


def error_report(command: str, exc: BaseException) -> tuple[int, str]:
    """``(exit code, the one line printed)`` for an exception that ends ``audiomoe COMMAND``: 2 for a
    configuration error, 130 for Ctrl-C (training names its last good checkpoint), 1 for anything else
    (a bug or an unforeseen input). Also what a rank started by ``train --nproc`` hands its launcher."""
    if isinstance(exc, AudioMoEError):
        return int(getattr(exc, "exit_code", 2)), f"audiomoe {command}: error: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, f"audiomoe {command}: {exc or 'interrupted'}"
    text = " ".join(str(exc).split())[:300]
    return 1, (
        f"audiomoe {command}: unexpected error: {type(exc).__name__}: {text} "
        f"(set {DEBUG_ENV}=1 for the traceback, and please report it)"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
