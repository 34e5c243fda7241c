"""Data throughput: built-in corpus generation time, and loader speed in seconds of audio per second.

The loader is timed end to end over one epoch of the built-in corpus (its 16 kHz and 22.05 kHz
clips: decode with soundfile + resample to 16 kHz with torchaudio + length-bucketed dynamic
batches of ``max_seconds`` + padding into ``AudioBatch``; the codec-code tasks ``tts`` and
``text_to_music`` read their codes, made once by ``corpus_codes`` as training makes them, timed
apart) with 0, 1 and 2 DataLoader workers,
interleaved, median over repetitions. The figure is audio seconds delivered per wall second
(``x`` real time; target >= 200x with 2 workers on 2 cores). Corpus generation is timed once
(``small``: about one hour of audio, target < 2 minutes on 2 cores; ``--quick`` and ``--smoke``: ``tiny``).

``--difficulty`` instead trains a tiny single-task model (``--model whisper``: a random-init
Whisper encoder of width 48; ``--model conv``: the ``tiny-cls`` conv front-end) with a
classification head, or a ``ctc_asr`` head for ASR, for ``--steps`` steps on each task
of the ``small`` corpus's train split and reports its test-split metric next to chance (tasks with
other heads, text answers or codec codes, are skipped with a note).

``--smoke``: the ``tiny`` corpus, 1 repetition, then ``--difficulty``'s path for 2 steps on one
classification and the ASR task of that corpus (seconds).

Usage: python benchmarks/data.py [--quick | --smoke] [--json FILE] [--reps N] [--dir DIR] [--difficulty [--steps 300]]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from audiomoe.data import build_loader, make_corpus

from _common import Report, add_mode_flags, mode_of

BENCH = "data"
#: the codebook layout the codec-code tasks' codes are made for (the ``codec`` head's defaults: 4 x 64);
#: the loader reads one .npy per clip whatever the layout
CODE_LAYOUT = (4, 64)
#: the heads ``--difficulty`` trains; corpus tasks with other heads (text answers, codec codes) are skipped
DIFFICULTY_HEADS = ("classification", "ctc_asr")


def loader_sources(manifest: Path, codes: Path) -> dict:
    """Loader sources for the whole corpus: the codec-code tasks from their codes manifest, every other task from the corpus."""
    import json

    from audiomoe.data.corpus.make import CODE_TASKS

    tasks = json.loads((manifest.parent / "corpus.json").read_text())["tasks"]
    return {"corpus": {"path": str(manifest), "only_tasks": [t for t in tasks if t not in CODE_TASKS]},
            "codes": {"path": str(codes), "only_tasks": [t for t in tasks if t in CODE_TASKS]}}  # fmt: skip


def epoch_seconds(sources: dict, workers: int) -> tuple[float, float]:
    """(wall seconds, audio seconds) of one full epoch with ``workers`` DataLoader workers."""
    loader = build_loader({"sources": sources, "max_seconds": 120, "num_workers": workers})
    t0 = time.perf_counter()
    audio = 0.0
    for batch in loader:
        audio += float(batch.lengths.sum()) / batch.sample_rate
    return time.perf_counter() - t0, audio


# The tiny single-task models: a random-init Whisper encoder (log-mel, 2 conv + transformer layers,
# width 48, 5 s window; 64k parameters with a head) and the bare conv front-end of tiny-cls (10 ms
# receptive field, mean pooled: it sees spectral texture but no rhythm or pitch contour).
ENCODERS = {
    "whisper": {"name": "whisper", "params": {"config": {"d_model": 48, "max_source_positions": 250}}},
    "conv": {"name": "conv_frontend", "params": {"dim": 32, "channels": 32}},
}


def difficulty(manifest: Path, steps: int, report: Report, tasks: list[str], model: str = "whisper") -> None:
    """Train a tiny model per task for ``steps`` steps; print test accuracy (CER for ASR) and chance."""
    import json

    from audiomoe.train import TrainConfig, train

    info = json.loads((manifest.parent / "corpus.json").read_text())["tasks"]
    print(f"{'task':<16} {'classes':>7} {'chance':>7} {'metric':>8} {'value':>7} {'seconds':>8}")
    for task in tasks:
        t = info[task]
        if t["head"] not in DIFFICULTY_HEADS:
            print(
                f"{task:<16} skipped: its head is '{t['head']}' (--difficulty trains {' / '.join(DIFFICULTY_HEADS)} heads)"
            )
            continue
        spec = {"d_model": 32, "encoder": ENCODERS[model]}
        if t["head"] == "ctc_asr":
            spec["tasks"] = {task: {"name": "ctc_asr"}}
            metric, chance, classes = "cer", 1.0, "-"
        else:
            n = len(t["labels"])
            spec["tasks"] = {task: {"name": "classification", "params": {"num_classes": n, "labels": t["labels"]}}}
            metric, chance, classes = "accuracy", 1.0 / n, str(n)

        def cfg(task: str, split: str, workers: int) -> dict:
            return {"sources": {"c": {"path": str(manifest), "split": split, "only_tasks": [task]}},
                    "max_seconds": 48, "max_items": 16, "max_clip_seconds": 5.0, "num_workers": workers, "seed": 0}  # fmt: skip

        data = build_loader(cfg(task, "train", 1)).stream()
        eval_data = list(build_loader(cfg(task, "test", 0)))
        t0 = time.perf_counter()
        result = train(
            spec, (), TrainConfig(steps=steps, eval_every=steps, progress=False, seed=0), data=data, eval_data=eval_data
        )
        value = result["eval_after"][f"{task}/{metric}"]
        print(f"{task:<16} {classes:>7} {chance:>7.3f} {metric:>8} {value:>7.3f} {time.perf_counter() - t0:>8.1f}")
        report.emit(f"difficulty({task},{model},{steps} steps)", metric, value, "")
        report.emit(f"difficulty({task},{model},{steps} steps)", "chance", chance, "")


def generation_and_loader(root: Path, size: str, reps: int, report: Report) -> Path:
    """Time making the ``size`` corpus into ``root`` and its codes, then the loader over one epoch; return the manifest."""
    import json

    from audiomoe.data.codes import corpus_codes

    t0 = time.perf_counter()
    manifest = make_corpus(root, size, seed=0, workers=2, progress=False)
    gen = time.perf_counter() - t0
    info = json.loads((root / "corpus.json").read_text())
    print(f"corpus {size}: {info['clips']} clips, {info['hours'] * 60:.1f} min of audio, made in {gen:.1f} s "
          f"({info['hours'] * 3600 / gen:.0f}x real time, 2 processes)")  # fmt: skip
    report.emit(f"make_corpus({size})", "seconds", gen, "s")
    report.emit(f"make_corpus({size})", "audio_minutes", info["hours"] * 60, "min")
    report.emit(f"make_corpus({size})", "speed", info["hours"] * 3600 / gen, "x")
    t0 = time.perf_counter()
    codes = corpus_codes(manifest, *CODE_LAYOUT)
    made = time.perf_counter() - t0
    print(f"codec codes ({CODE_LAYOUT[0]} x {CODE_LAYOUT[1]}, mel_rvq fitted on the train clips) made in {made:.1f} s")
    report.emit(f"corpus_codes({size},k={CODE_LAYOUT[0]},v={CODE_LAYOUT[1]})", "seconds", made, "s")

    sources = loader_sources(manifest, codes)
    times: dict[int, list[float]] = {w: [] for w in (0, 1, 2)}
    audio = 0.0
    epoch_seconds(sources, 0)  # warm the page cache
    for _ in range(reps):
        for w in times:  # interleaved
            dt, audio = epoch_seconds(sources, w)
            times[w].append(dt)
    print(f"\nloader over one epoch ({audio / 60:.1f} min of audio; decode + resample + bucket + pad), "
          f"median of {reps}, torch {torch.__version__}")  # fmt: skip
    print(f"{'workers':>7} {'seconds':>9} {'audio s / s':>12}")
    for w, v in times.items():
        med = statistics.median(v)
        print(f"{w:>7} {med:>9.2f} {audio / med:>11.0f}x")
        report.emit(f"loader(workers={w})", "seconds", med, "s")
        report.emit(f"loader(workers={w})", "throughput", audio / med, "x")
    return manifest


def main() -> None:
    """Time corpus generation and the loader (or, with ``--difficulty``, train a tiny model per task); print, write JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mode_flags(ap, "tiny corpus, 2 repetitions (same code paths)")
    ap.add_argument("--json", metavar="FILE", help="also write JSON lines here")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per case (median reported)")
    ap.add_argument("--dir", default=None, help="where to write the corpus (default: a temporary folder)")
    ap.add_argument("--difficulty", action="store_true", help="train a tiny model per task instead of timing")
    ap.add_argument("--steps", type=int, default=300, help="--difficulty: training steps per task")
    ap.add_argument("--tasks", default="asr,language,speaker,style,event,instrument,tempo,mode,mix_background")
    ap.add_argument("--model", choices=sorted(ENCODERS), default="whisper", help="--difficulty: the tiny encoder")
    args = ap.parse_args()
    mode = mode_of(args)
    report = Report(BENCH, mode, "cpu")
    size = "small" if mode == "full" else "tiny"
    if args.difficulty:
        from audiomoe.data import builtin_corpus

        manifest = builtin_corpus(args.dir, size)
        steps = {"full": args.steps, "quick": 20, "smoke": 2}[mode]
        difficulty(manifest, steps, report, args.tasks.split(","), args.model)
        report.write(args.json)
        return
    reps = args.reps or {"full": 3, "quick": 2, "smoke": 1}[mode]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generation_and_loader(Path(args.dir or tmp) / f"corpus-{size}", size, reps, report)
        if mode == "smoke":  # --difficulty's path too, on the corpus just made: one classification task and ASR
            print()
            difficulty(manifest, 2, report, ["event", "asr"], args.model)
    report.write(args.json)


if __name__ == "__main__":
    main()
