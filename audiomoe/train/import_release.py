"""`audiomoe import unimoe-audio DIR --out RUN`: a released UniMoE-Audio checkpoint as an audiomoe run directory.

The release's ``config.json`` sizes the ``unimoe-audio`` preset (:func:`~audiomoe.backbones.unimoe_import.
spec_overrides`), its weights load strictly by the documented key map
(:func:`~audiomoe.backbones.unimoe_import.load_released_state`), and the model is written as step 0 of
a run directory (``RUN/step-000000``, ``RUN/latest``), which ``predict``, ``eval`` and a recipe stage's
``init: {from_checkpoint: RUN}`` (fine-tuning) read like any trained run. ``RUN/import.json`` records
what was imported, skipped (the vision tower) and left fresh (encoder, adapter, task tokens).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from audiomoe.core.errors import AudioMoEError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def import_unimoe_audio(
    directory: str, out: str, *, preset: str = "unimoe-audio", overrides: Sequence[str] = (), overwrite: bool = False
) -> dict[str, Any]:
    """Import the release in ``directory`` into a run directory ``out``; returns the import report."""
    from audiomoe.backbones.unimoe_import import init_task_tokens, load_released_state, read_released, spec_overrides
    from audiomoe.core.composer import compose
    from audiomoe.train.checkpoint import save_checkpoint

    root = Path(out)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise AudioMoEError(f"'{root}' is not empty; give another --out or --overwrite")
    config, state = read_released(directory)
    over = spec_overrides(config)
    if any((Path(directory) / f).is_file() for f in TOKENIZER_FILES):
        over.append(f"backbone.tokenizer={Path(directory).expanduser().resolve()}")
    model = compose(preset, [*over, *overrides])
    report = load_released_state(model, state)
    report["task_tokens_from_markers"] = init_task_tokens(model)
    report |= {"source": str(Path(directory).resolve()), "preset": preset, "overrides": [*over, *overrides]}
    path = save_checkpoint(model, root, 0, extra={"imported": "unimoe-audio"})
    report["checkpoint"] = str(path)
    skipped = report.pop("skipped")
    report["skipped"] = {"count": len(skipped), "prefixes": sorted({k.split(".")[0] + "." for k in skipped})}
    (root / "import.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def cmd_import(args: argparse.Namespace) -> int:
    """``audiomoe import unimoe-audio DIR --out RUN``: a released checkpoint as a run directory."""
    report = import_unimoe_audio(
        args.directory, args.out, preset=args.preset, overrides=args.set, overwrite=args.overwrite
    )
    print(
        f"imported {report['loaded']} tensors from {report['source']} into {report['checkpoint']}; "
        f"skipped {report['skipped']['count']} ({', '.join(report['skipped']['prefixes']) or 'none'}); "
        f"fresh: {', '.join(report['fresh'])}"
    )
    return 0


def register(sub: Any) -> None:
    """Add ``import unimoe-audio`` to the ``audiomoe`` command's subparsers."""
    p = sub.add_parser("import", help="a released checkpoint as a run directory: `import unimoe-audio DIR --out RUN`")
    releases = p.add_subparsers(dest="import_command", metavar="RELEASE", required=True)
    q = releases.add_parser(
        "unimoe-audio", help="UniMoE-Audio's release (config.json + safetensors) into the unimoe-audio preset"
    )
    q.add_argument("directory", metavar="DIR", help="local directory of the release")
    q.add_argument("--out", required=True, metavar="RUN", help="run directory to write (step-000000, latest)")
    q.add_argument("--preset", default="unimoe-audio", help="preset the release's sizes are set on [unimoe-audio]")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (e.g. the encoder path)")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    q.set_defaults(func=cmd_import)
