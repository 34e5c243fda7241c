"""The ``audiomoe data`` commands: ``data make`` writes the built-in offline corpus, ``data from-csv`` turns a CSV of
labels into a JSONL manifest (registered into the main parser by ``audiomoe.cli``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from audiomoe.core.argtypes import int_in
from audiomoe.core.limits import MAX_SEED


def cmd_data_make(args: argparse.Namespace) -> int:
    """Write the built-in offline corpus (wavs + manifest.jsonl + corpus.json) into DIR."""
    import time

    from audiomoe.data.corpus.make import make_corpus

    t0 = time.perf_counter()
    manifest = make_corpus(args.dir, args.size, args.seed, workers=args.workers)
    info = json.loads((manifest.parent / "corpus.json").read_text(encoding="utf-8"))
    print(
        f"{manifest}: {info['clips']} clips, {info['lines']} lines, {info['hours'] * 60:.1f} min of audio in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def cmd_data_from_csv(args: argparse.Namespace) -> int:
    """Turn a CSV of labels (+ a folder of audio files) into a JSONL manifest."""
    from audiomoe.data.csv_import import manifest_from_csv
    from audiomoe.data.manifest import read_manifest

    out = manifest_from_csv(
        args.csv,
        args.out,
        audio_dir=args.audio_dir,
        task=args.task,
        audio_column=args.audio_column,
        target_column=args.target_column,
    )
    items, _ = read_manifest(out, check_files=False)  # what a training run will read: the written file, validated again
    rows = [{"target": it.target, "split": it.split} for it in items]
    targets = [r.get("target") for r in rows]
    labels = sorted({t for t in targets if isinstance(t, str)})
    print(f"wrote {out} ({len(targets)} items, {len(labels)} distinct labels)")
    train = {r.get("target") for r in rows if (r.get("split") or "train") == "train"}  # no split: a training line
    only_held_out = [x for x in labels if x not in train]
    if only_held_out and len(train) > 0:
        print(
            f"warning: label(s) only outside the train split (a head cannot learn them): {', '.join(only_held_out[:10])}"
        )
    if len(targets) >= 10 and len(labels) > len(targets) // 2:  # mostly unique strings: transcripts or answers
        print(
            f"the targets look like transcripts ({len(labels)} distinct of {len(targets)}): train a ctc or text head "
            f"named '{args.task}' on it (see docs/components.md, Heads)"
        )
    elif labels and len(labels) <= 1000 and not any("'" in x for x in labels):  # the flags of a head that reads it
        t = args.task
        print(
            f"a classification head for it: --set tasks.{t}=classification --set tasks.{t}.num_classes={len(labels)} "
            f"--set 'tasks.{t}.labels={json.dumps(labels, ensure_ascii=False, separators=(',', ':'))}'"
        )
    return 0


def register(sub: Any) -> None:
    """Add ``data make`` and ``data from-csv`` to the main parser's subcommands."""
    p = sub.add_parser("data", help="data tools: make the built-in corpus, CSV -> manifest")
    data_sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    q = data_sub.add_parser("make", help="write the built-in offline corpus (speech, events, music, mixtures, QA)")
    q.add_argument("dir", metavar="DIR")
    q.add_argument(
        "--size", choices=["tiny", "small", "medium"], default="small", help="small: about 1 hour; medium: about 10"
    )
    q.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="same seed, same bytes")
    q.add_argument("--workers", type=int_in(1, 256), default=2, help="processes")
    q.set_defaults(func=cmd_data_make)
    q = data_sub.add_parser("from-csv", help="CSV of labels (+ folder of audio) -> JSONL manifest")
    q.add_argument("csv", metavar="CSV")
    q.add_argument("out", metavar="OUT.jsonl")
    q.add_argument("--task", required=True, help="task name of every item")
    q.add_argument("--audio-dir", default=None, help="folder the file names are relative to (default: the CSV's)")
    q.add_argument("--audio-column", default="file")
    q.add_argument("--target-column", default="label")
    q.set_defaults(func=cmd_data_from_csv)
