"""The ``audiomoe data`` commands: ``data make`` writes the built-in offline corpus, ``data from-csv`` turns a CSV of
labels into a JSONL manifest (registered into the main parser by ``audiomoe.cli``)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from audiomoe.core.argtypes import int_in
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.limits import MAX_SEED


def cmd_data_make(args: argparse.Namespace) -> int:
    """Write the built-in offline corpus (wavs + manifest.jsonl + corpus.json) into DIR; with --codec, its codes too."""
    import time

    from audiomoe.data.corpus.make import make_corpus

    codec = _codec(args.codec, args.codec_path, args.codec_param)  # flags checked before minutes of corpus making
    t0 = time.perf_counter()
    manifest = make_corpus(args.dir, args.size, args.seed, workers=args.workers)
    info = json.loads((manifest.parent / "corpus.json").read_text(encoding="utf-8"))
    print(
        f"{manifest}: {info['clips']} clips, {info['lines']} lines, {info['hours'] * 60:.1f} min of audio in {time.perf_counter() - t0:.1f} s"
    )
    if codec is not None:
        _make_codes(manifest, args.codec, codec)
    return 0


def _codec_params(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` flags as params, each value read as YAML (``bandwidth=6.0``, ``num_quantizers=8``)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise AudioMoEError(f"--codec-param '{pair}': expected KEY=VALUE, e.g. --codec-param bandwidth=6.0")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _codec(name: Optional[str], path: Optional[str], pairs: list[str]) -> Any:
    """The codec ``--codec`` names (a local checkpoint at ``--codec-path``), or None without the flag."""
    from audiomoe.core.composer import component_builder

    if name is None:
        if path is not None or pairs:
            raise AudioMoEError("--codec-path and --codec-param need --codec NAME (e.g. --codec dac --codec-path DIR)")
        return None
    params = _codec_params(pairs)
    if name == "mel_rvq":
        if path is not None or set(params) - {"num_codebooks", "codebook_size"}:
            raise AudioMoEError(
                "--codec mel_rvq is fitted on the corpus: it takes no --codec-path, and only "
                "--codec-param num_codebooks=K / codebook_size=V (the layout training asks for)"
            )
    elif path is None:
        raise AudioMoEError(
            f"--codec {name} needs --codec-path DIR: a local directory with its weights in Hugging Face layout "
            "(save_pretrained, or a snapshot of the released checkpoint); audiomoe never downloads"
        )
    else:
        params["pretrained"] = path
    return component_builder("codec", {"name": name, "params": params})()


def _make_codes(manifest: Any, name: str, codec: Any) -> None:
    """Encode the corpus's codec tasks with ``codec`` (mel_rvq: fitted first), cached beside the corpus."""
    from audiomoe.data.codes import codec_codes, corpus_codes
    from audiomoe.data.corpus.make import CODE_TASKS

    if name == "mel_rvq":  # the layout-named cache training reads (codes-k<K>-v<V>)
        out = corpus_codes(manifest, codec.num_codebooks, codec.codebook_size, tasks=CODE_TASKS)
    else:
        out = codec_codes(manifest, codec, tasks=CODE_TASKS)
    print(
        f"{out}: {', '.join(CODE_TASKS)} as {name} codes ({codec.num_codebooks} codebooks x {codec.codebook_size}, "
        f"{codec.frame_rate:g} frames/s at {codec.sample_rate} Hz)"
    )


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
    q.add_argument(
        "--codec",
        default=None,
        metavar="NAME",
        help="also write the codec tasks' codes with this codec (mel_rvq, dac, encodec, mimi), cached beside the corpus",
    )
    q.add_argument("--codec-path", default=None, metavar="DIR", help="the codec's local weights (Hugging Face layout)")
    q.add_argument(
        "--codec-param", action="append", default=[], metavar="KEY=VALUE", help="a codec param, e.g. bandwidth=6.0"
    )
    q.set_defaults(func=cmd_data_make)
    q = data_sub.add_parser("from-csv", help="CSV of labels (+ folder of audio) -> JSONL manifest")
    q.add_argument("csv", metavar="CSV")
    q.add_argument("out", metavar="OUT.jsonl")
    q.add_argument("--task", required=True, help="task name of every item")
    q.add_argument("--audio-dir", default=None, help="folder the file names are relative to (default: the CSV's)")
    q.add_argument("--audio-column", default="file")
    q.add_argument("--target-column", default="label")
    q.set_defaults(func=cmd_data_from_csv)
