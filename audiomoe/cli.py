"""The ``audiomoe`` command line.

``--help``, ``list`` and ``plugins`` never import torch, so they answer in a fraction of a second
even with many plugins installed; ``describe``, ``validate`` and ``compose`` import the
components they touch.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from .core.errors import AudioMoEError

EPILOG = """examples:
  audiomoe list router                      routers from every installed plugin
  audiomoe describe router/linear_topk      params with types, defaults, limits, an example
  audiomoe validate my.yaml --set backbone.router.k=1
  audiomoe compose tiny-moe-cls --set backbone.router=linear_topk --set backbone.num_experts=8
  audiomoe train tiny-moe-cls --steps 200 --out runs/tiny
"""


def _registry() -> Any:
    from .core.registry import get_registry

    return get_registry()


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    """Print loaded, failed and disabled plugins with versions."""
    reg = _registry()
    records = sorted(reg.plugins.values(), key=lambda r: r.name)
    if args.json:
        print(json.dumps([r.__dict__ for r in records], indent=2))
        return 0
    rows = [[r.name, r.dist, r.version or "-", r.status, str(r.components), str(r.presets), r.error or r.source] for r in records]
    print(_table(rows, ["plugin", "distribution", "version", "status", "components", "presets", "source / error"]))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List components (optionally one kind, glob-filtered) or presets."""
    reg = _registry()
    if args.kind in ("preset", "presets"):
        presets = reg.list_presets(args.pattern)
        print(_table([[p.name, p.plugin, p.summary] for p in presets], ["preset", "plugin", "summary"]))
        return 0
    entries = reg.list_components(args.kind, args.pattern)
    if args.json:
        print(json.dumps([e.__dict__ for e in entries], indent=2))
        return 0
    keys = [(e.kind, e.name) for e in entries]
    rows = [[e.kind, e.qualified_name if keys.count((e.kind, e.name)) > 1 else e.name, e.plugin, e.summary] for e in entries]
    print(_table(rows, ["kind", "name", "plugin", "summary"]))
    if args.kind is None and args.pattern == "*":
        print(f"\npresets: {', '.join(p.name for p in reg.list_presets())}  (audiomoe list preset)")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    """Describe ``KIND/NAME``: params with types, defaults, limits, descriptions, and an example."""
    from .core.describe import describe

    kind, sep, name = args.component.partition("/")
    if not sep or not name:
        raise AudioMoEError(f"describe takes KIND/NAME (e.g. router/linear_topk), got '{args.component}'")
    info = describe(kind, name)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
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
    print("\nexample:\n" + "\n".join("  " + line for line in info["example"].splitlines()))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a config (preset, YAML path) with overrides; print the resolved spec."""
    import yaml

    from .core.composer import resolve

    resolved = resolve(args.config, args.set)
    print(yaml.safe_dump(resolved.to_dict(), sort_keys=False).rstrip())
    print(f"\nOK: {args.config} is valid", file=sys.stderr)
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
    from .core.composer import compose, count_parameters

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
    if not args.no_probe and any(hasattr(m, "last_stats") for m in model.modules()):
        model.probe()  # top-p picks vary per token: count what a forward actually used
        note = "  (MoE picks measured on 2 noise clips; --no-probe for the static count)"
    total, active = count_parameters(model)
    print(f"\nparameters: total {total:,}  active per token {active:,.0f} ({active / max(total, 1):.1%}){note}")
    if args.save_spec:
        import yaml

        with open(args.save_spec, "w", encoding="utf-8") as fh:
            yaml.safe_dump(model.spec, fh, sort_keys=False)
        print(f"resolved spec written to {args.save_spec}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a preset on the built-in synthetic audio task (the main job); see audiomoe.train."""
    from .train import TrainConfig, train

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, out_dir=args.out, seed=args.seed, eval_every=args.eval_every)
    result = train(args.preset, args.set, cfg)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="audiomoe",
        description="audiomoe: compose multi-task audio models from plugin components (encoders, routers, experts, tasks).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version="audiomoe 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="loaded, failed and disabled plugins, with versions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("list", help="list components: [KIND] [GLOB]; KIND 'preset' lists presets")
    p.add_argument("kind", nargs="?", default=None, help="encoder, router, expert, task, backbone, preset, ...")
    p.add_argument("pattern", nargs="?", default="*", help="glob on the name, e.g. '*top*'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("describe", help="params, defaults, limits and an example for KIND/NAME")
    p.add_argument("component", metavar="KIND/NAME")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_describe)

    for name, func, what in (("validate", cmd_validate, "CONFIG"), ("compose", cmd_compose, "PRESET")):
        p = sub.add_parser(name, help=f"{'validate a config and print the resolved spec' if name == 'validate' else 'build a model and print its parts and parameter counts'}")
        p.add_argument("config" if name == "validate" else "preset", metavar=what, help="preset name or YAML path")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. backbone.router.k=1 (repeatable)")
        if name == "compose":
            p.add_argument("--save-spec", metavar="FILE", help="write the resolved spec as YAML")
            p.add_argument("--no-probe", action="store_true", help="count active parameters without a forward on noise")
        p.set_defaults(func=func)

    p = sub.add_parser("train", help="train a preset on the synthetic audio task, with checkpoints")
    p.add_argument("preset", help="preset name or YAML path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for checkpoints (model.safetensors + spec.yaml)")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``audiomoe`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except AudioMoEError as exc:
        print(f"audiomoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
