"""Evaluation: the periodic eval during training, and ``audiomoe eval CHECKPOINT --data ...``.

:func:`evaluate` (training) averages every head's ``metrics()`` over a few held-out batches;
:class:`Evaluator` runs it before a run's first step and every ``eval.every`` steps (and at each
stage's end), keeping the history in the run state.
:func:`evaluate_checkpoint` (the command) runs a checkpoint over a whole split and computes each
head's metrics once over *all* its items (so macro-F1, mAP, WER and BLEU are corpus-level, not
means of batch values), per task and per dataset: accuracy and macro-F1 (single-label), mAP,
macro-F1 and subset accuracy (multi-label), WER / CER (CTC, jiwer), WER / CER / BLEU / exact match
(AudioLLM, jiwer + sacrebleu). :func:`format_report` prints it as tables. A clip over ``max_seconds``
is cropped for clip-level heads only, refused for the others (:mod:`audiomoe.train.longaudio`).
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch

from audiomoe.core.batch import AudioBatch
from audiomoe.core.errors import AudioMoEError
from audiomoe.train.longaudio import DEFAULT_MAX_SECONDS, check_max_seconds

if TYPE_CHECKING:
    from audiomoe.train.distributed import Dist
    from audiomoe.train.run_state import RunState


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[AudioBatch]) -> dict[str, float]:
    """Mean of every head's metrics over ``batches``, as ``{"<task>/<metric>": value}``."""
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        out = model(AudioBatch(batch.waveforms, batch.sample_rate, batch.tasks, batch.lengths, None, batch.prompts))
        for name, preds in out.predictions.items():
            idx = out.indices[name].tolist()
            head = model.heads[name]
            targets = head.make_targets([batch.targets[i] for i in idx], model.device)
            for k, v in head.metrics(preds, targets).items():
                sums[f"{name}/{k}"] = sums.get(f"{name}/{k}", 0.0) + float(v)
                counts[f"{name}/{k}"] = counts.get(f"{name}/{k}", 0) + 1
    model.train()
    return {k: sums[k] / counts[k] for k in sorted(sums)}


class Evaluator:
    """A stage's evaluations during training, on ``batches`` (held out), into ``state.history`` and the log.

    Rank 0 evaluates; under a sharded layout every rank does (its forward is collective) with the same
    batches, and rank 0 records. Whether there is anything to evaluate is rank 0's answer, given to every
    rank (collective, at construction). An evaluation never moves the training RNG.
    """

    def __init__(
        self, model: torch.nn.Module, dist: Dist, batches: list[AudioBatch], every: int, state: RunState
    ) -> None:
        self.model, self.dist, self.batches, self.every, self.state = model, dist, batches, every, state
        self.enabled = int(dist.gather(torch.tensor([len(batches)]))[0, 0]) > 0
        self.latest: Optional[dict[str, float]] = None  # this stage's last metrics (the stage summary's ``eval``)

    def run(self) -> dict[str, float]:
        """The metrics of the model now (:func:`evaluate`), with the caller's RNG state untouched."""
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return evaluate(self.model, self.batches)

    def before(self) -> None:
        """The run's evaluation before its first step (once per process, by the first stage that trains)."""
        if self.state.before is None and self.batches:
            self.state.before = self.run()

    def maybe_run(self, step: int, final: bool, train_loss: float) -> bool:
        """Evaluate when due (every ``every`` steps, and at the stage's ``final`` step); whether it was due."""
        due = self.enabled and (step % self.every == 0 or final)
        if due and self.batches:  # rank 0, or every rank of a sharded run
            metrics = self.latest = self.run()
            # train_loss is the step's training batch, not held out
            self.state.history.append({"step": step, "train_loss": train_loss, **metrics})
            if self.state.log is not None:
                self.state.log.eval(step, metrics)
        return due


def _items(model: Any, data: Any, split: str) -> list[Any]:
    """The items of ``data`` (builtin, a manifest path, a data YAML or mapping) for the model's tasks."""
    from audiomoe.data import builtin_corpus
    from audiomoe.data.spec import load_data_spec
    from audiomoe.train.data import corpus_paths, manifest_sources

    tasks = list(model.task_names)
    base_dir = None
    if (
        isinstance(data, (str, os.PathLike))
        and data not in ("auto", "builtin")
        and not str(data).endswith((".yaml", ".yml"))
    ):
        if not os.path.isfile(data):  # a manifest, whatever its extension (.jsonl, .manifest, .json)
            raise AudioMoEError(f"--data '{data}': no such manifest file")
        config: Any = {"sources": manifest_sources({t: str(data) for t in tasks}, split)}
    elif data in ("auto", "builtin"):
        path = str(builtin_corpus(progress=False))
        config = {"sources": manifest_sources(corpus_paths(model, path, tasks), split)}
    else:  # a data spec: its sources are read at this split (eval's --split), whatever split they name
        if isinstance(data, (str, os.PathLike)):
            from audiomoe.core.safe_yaml import load_yaml_file

            base_dir, data = os.path.dirname(os.path.abspath(data)), load_yaml_file(str(data), "data")
        config = copy.deepcopy(dict(data))
        config = config.get("data", config) if set(config) == {"data"} else config
        for src in (config.get("sources") or {}).values():
            if isinstance(src, dict):
                src["split"] = split
    spec, sources = load_data_spec(config, base_dir=base_dir)
    items = []
    for name, src in sources.items():
        its, _ = src.items(task=spec.sources[name].task, tasks=spec.tasks, skip_bad=spec.skip_bad)
        items += [it for it in its if it.task in tasks]  # a data spec's own sources choose their splits
    if not items:
        raise AudioMoEError(f"--data {data!r} has no '{split}' items for this model's tasks ({', '.join(tasks)})")
    return items


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: str,
    data: Any = "auto",
    *,
    split: str = "test",
    batch_size: int = 16,
    max_items: Optional[int] = None,
    device: str = "auto",
    tone_batches: int = 8,
    seed: int = 0,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    asr_run: Optional[str] = None,
) -> dict[str, Any]:
    """Metrics of a checkpoint per task and per dataset: ``{"tasks": {...}, "datasets": {...}, "items": {...}}``.

    ``data="auto"``: the data the checkpoint's run trained on when it recorded one, else the corpus or tones.
    Clips longer than ``max_seconds`` are cropped (a window, seed 0) for clip-level heads only; a longer
    clip of any other head (a transcript, an answer, codes) is refused before the model runs, naming it.
    Codec tasks get ``mel_distance`` (and, with an ASR head in the model or ``asr_run``, ``asr_wer`` of the
    generated speech): :func:`audiomoe.train.codec_audio.codec_scores`.
    """
    from audiomoe.train.checkpoint import load_checkpoint
    from audiomoe.train.distributed import pick_device
    from audiomoe.train.heldout import pick_items, predict_items, score_task, task_metrics
    from audiomoe.train.rundir import recorded_data

    max_seconds = check_max_seconds(max_seconds)
    if data == "auto":  # the run's own data when it recorded one (a manifest of the user's), else the corpus / tones
        data = recorded_data(checkpoint) or "auto"
    model = load_checkpoint(checkpoint).to(pick_device(device)).eval()
    groups: dict[tuple[str, str], list[tuple[Any, Any]]] = {}
    generated: dict[str, list[tuple[Any, Any, Any]]] = {}
    if data == "tones" or (data == "auto" and not _corpus_model(model)):
        from audiomoe.train.data import build_data

        _, batches = build_data(model, "tones", None, batch_size=batch_size, seed=seed, eval_batches=tone_batches)
        for batch in batches:
            out = model(AudioBatch(batch.waveforms, batch.sample_rate, batch.tasks, batch.lengths, None, batch.prompts))
            for name, preds in out.predictions.items():
                for j, i in enumerate(out.indices[name].tolist()):
                    pred = preds[j : j + 1] if isinstance(preds, torch.Tensor) else [preds[j]]
                    groups.setdefault((name, "tones"), []).append((pred, batch.targets[i]))
    else:  # the first max_items of every task: a multi-task model is evaluated on each of its heads
        items = pick_items(_items(model, data, split), max_items)
        generated = predict_items(model, items, batch_size, max_seconds, "eval")
        for name, triples in generated.items():
            for pred, target, item in triples:
                groups.setdefault((name, item.dataset or "data"), []).append((pred, target))
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "data": data if isinstance(data, str) else "spec",
        "split": split,
        "tasks": {},
        "datasets": {},
        "items": {},
        "interval": {},
        "chance": {},
    }
    for task in model.task_names:
        keys = sorted(d for t, d in groups if t == task)
        if not keys:
            continue
        head = model.heads[task]
        scored = score_task(head, [pair for d in keys for pair in groups[(task, d)]], model.device)
        report["tasks"][task], report["items"][task] = scored["metrics"], scored["items"]
        if "interval" in scored:  # single-label accuracy: Wilson's 95% interval and the majority-class rate
            report["interval"][task], report["chance"][task] = scored["interval"], scored["chance"]
        if len(keys) > 1:
            report["datasets"][task] = {
                d: {**task_metrics(head, groups[(task, d)], model.device), "items": len(groups[(task, d)])}
                for d in keys
            }
    from audiomoe.train.checkpoint import resolve_checkpoint
    from audiomoe.train.codec_audio import codec_scores

    asr = load_checkpoint(str(resolve_checkpoint(asr_run))).to(model.device).eval() if asr_run else None
    asr = asr if asr is not None else (model if "asr" in model.task_names else None)
    for task, sc in codec_scores(model, generated, asr).items():  # generated audio vs the reference clip
        report["tasks"][task]["mel_distance"] = sc["mel_distance"]
        if "asr_wer" in sc:
            report["tasks"][task]["asr_wer"] = sc["asr_wer"]
        report["interval"].setdefault(task, {})["mel_distance"] = sc["interval"]
    return report


def _corpus_model(model: Any) -> bool:
    from audiomoe.data.corpus.make import CORPUS_TASKS

    return set(model.task_names) <= set(CORPUS_TASKS)


def format_report(report: dict[str, Any]) -> str:
    """The report as text tables: one row per task, then one per (task, dataset) when there are several."""
    names = sorted({k for m in report["tasks"].values() for k in m})
    head = ["task", "items"] + names
    rows = [
        [t, str(report["items"][t])] + [f"{m[k]:.4f}" if k in m else "-" for k in names]
        for t, m in report["tasks"].items()
    ]
    others = sorted({m for iv in report.get("interval", {}).values() for m in iv if m != "accuracy"})
    for m in others:  # e.g. mel_distance of generated audio: its mean's 95% interval
        head.append(f"{m} 95% interval")
        for row, t in zip(rows, report["tasks"]):
            iv = report["interval"].get(t, {}).get(m)
            row.append(f"[{iv[0]:.4f}, {iv[1]:.4f}]" if iv and iv[0] == iv[0] else "-")
    if any("accuracy" in iv for iv in report.get("interval", {}).values()):  # and the majority-label rate
        head += ["accuracy 95% interval", "chance"]
        for row, t in zip(rows, report["tasks"]):
            iv, ch = report["interval"].get(t, {}).get("accuracy"), report["chance"].get(t, {}).get("accuracy")
            row += [f"[{iv[0]:.4f}, {iv[1]:.4f}]", f"{ch:.4f}"] if iv else ["-", "-"]
    text = _table(rows, head)
    if report["datasets"]:
        drows = [
            [t, d, str(m["items"])] + [f"{m[k]:.4f}" if k in m else "-" for k in names]
            for t, per in report["datasets"].items()
            for d, m in per.items()
        ]
        text += "\n\nper dataset:\n" + _table(drows, ["task", "dataset", "items"] + names)
    return text


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows])
