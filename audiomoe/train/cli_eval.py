"""The ``audiomoe eval`` and ``audiomoe predict`` commands: score a checkpoint on held-out data, or run it on audio files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint per task and per dataset; print tables and write JSON."""
    from audiomoe.core.atomic import check_output, write_text
    from audiomoe.train.checkpoint import resolve_checkpoint
    from audiomoe.train.evaluate import evaluate_checkpoint, format_report

    ckpt = resolve_checkpoint(args.checkpoint)
    path = args.json or str(ckpt.parent / f"eval-{args.split}.json")
    check_output(path, what="--json", inputs=[args.data])  # before the eval, which may take long, not after it
    report = evaluate_checkpoint(
        str(ckpt),
        args.data,
        split=args.split,
        batch_size=args.batch_size,
        max_items=args.max_items,
        device=args.device,
        max_seconds=args.max_seconds,
        asr_run=args.asr_run,
    )
    write_text(path, json.dumps(report, indent=2), what="--json")
    print(f"{ckpt} on {report['data']} ({args.split}):\n")
    print(format_report(report))
    print(f"\nwritten to {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Run a checkpoint on audio files: one line per file and head (codec heads also write .npy / .wav)."""
    from audiomoe.train.predict import predict_files

    rows = predict_files(
        args.checkpoint,
        args.audio,
        tasks=args.task or None,
        prompt=args.prompt,
        codec=args.codec,
        out_dir=args.out,
        device=args.device,
        max_seconds=args.max_seconds,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        extra = "".join(f"  {k}: {r[k]}" for k in ("codes", "wav", "window_seconds") if r.get(k))
        print(f"{r['audio']}  [{r['task']}]  {r['prediction']}{extra}")
    pages = sorted({str(Path(r["wav"]).parent / "index.html") for r in rows if r.get("wav")})
    for page in pages:
        print(f"listen: {page}")
    return 0
