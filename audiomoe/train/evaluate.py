"""Evaluation: the periodic eval during training, and ``audiomoe eval CHECKPOINT --data ...``.

:func:`evaluate` (training) averages every head's ``metrics()`` over a few held-out batches.
:func:`evaluate_checkpoint` (the command) runs a checkpoint over a whole split and computes each
head's metrics once over *all* its items (so macro-F1, mAP, WER and BLEU are corpus-level, not
means of batch values), per task and per dataset: accuracy and macro-F1 (single-label), mAP,
macro-F1 and subset accuracy (multi-label), WER / CER (CTC, jiwer), WER / CER / BLEU / exact match
(AudioLLM, jiwer + sacrebleu). :func:`format_report` prints it as tables.
"""

from __future__ import annotations

import json
import copy
import os
from typing import Any, Iterable, Optional, Sequence

import torch

from ..core.errors import AudioMoEError
from ..model import AudioBatch


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


def _merge(parts: list[Any]) -> Any:
    """Predictions of several batches as one: tensors concatenated on dim 0, lists joined."""
    if parts and all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat([p.cpu() for p in parts])
    out: list[Any] = []
    for p in parts:
        out += list(p)
    return out


def _items(model: Any, data: Any, split: str) -> list[Any]:
    """The items of ``data`` (builtin, a manifest path, a data YAML or mapping) for the model's tasks."""
    from ..data import builtin_corpus
    from ..data.spec import load_data_spec
    from .data import corpus_paths, manifest_sources

    tasks = list(model.task_names)
    base_dir = None
    if isinstance(data, (str, os.PathLike)) and data not in ("auto", "builtin") and not str(data).endswith((".yaml", ".yml")):
        if not os.path.isfile(data):  # a manifest, whatever its extension (.jsonl, .manifest, .json)
            raise AudioMoEError(f"--data '{data}': no such manifest file")
        config: Any = {"sources": manifest_sources({t: str(data) for t in tasks}, split)}
    elif data in ("auto", "builtin"):
        path = str(builtin_corpus(progress=False))
        config = {"sources": manifest_sources(corpus_paths(model, path, tasks), split)}
    else:  # a data spec: its sources are read at this split (eval's --split), whatever split they name
        if isinstance(data, (str, os.PathLike)):
            from ..core.safe_yaml import load_yaml_file

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
    checkpoint: str, data: Any = "auto", *, split: str = "test", batch_size: int = 16, max_items: Optional[int] = None,
    device: str = "auto", tone_batches: int = 8, seed: int = 0,
) -> dict[str, Any]:
    """Metrics of a checkpoint per task and per dataset: ``{"tasks": {...}, "datasets": {...}, "items": {...}}``.

    ``data="auto"``: the data the checkpoint's run trained on when it recorded one, else the corpus or tones.
    """
    from ..data.loader import ItemDataset, collate
    from .checkpoint import load_checkpoint
    from .distributed import pick_device
    from .rundir import recorded_data

    if data == "auto":  # the run's own data when it recorded one (a manifest of the user's), else the corpus / tones
        data = recorded_data(checkpoint) or "auto"
    model = load_checkpoint(checkpoint).to(pick_device(device)).eval()
    sr = int(model.encoder.sample_rate)
    groups: dict[tuple[str, str], list[tuple[Any, Any]]] = {}
    if data == "tones" or (data == "auto" and not _corpus_model(model)):
        from .data import build_data

        _, batches = build_data(model, "tones", None, batch_size=batch_size, seed=seed, eval_batches=tone_batches)
        stream = [(b, ["tones"] * len(b.task_list())) for b in batches]
    else:
        items = _items(model, data, split)
        if max_items:  # the first N of every task: a multi-task model is evaluated on each of its heads
            per_task: dict[str, list[Any]] = {}
            for it in items:
                per_task.setdefault(it.task, []).append(it)
            items = [it for its in per_task.values() for it in its[:max_items]]
        ds = ItemDataset(items, sr, max_clip_seconds=30.0)
        order = sorted(range(len(items)), key=lambda i: (items[i].task, items[i].dataset, items[i].duration))
        stream = []
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            batch, bad = collate([ds[(i, 0)] for i in chunk], sr)  # ds[...] also loads codec codes
            if batch is None or bad:
                raise AudioMoEError(f"cannot evaluate on {data!r}: {'; '.join(bad)}")
            stream.append((batch, [items[i].dataset or "data" for i in chunk]))
    for batch, datasets in stream:
        out = model(AudioBatch(batch.waveforms, batch.sample_rate, batch.tasks, batch.lengths, None, batch.prompts))
        for name, preds in out.predictions.items():
            idx = out.indices[name].tolist()
            for j, i in enumerate(idx):
                pred = preds[j : j + 1] if isinstance(preds, torch.Tensor) else [preds[j]]
                groups.setdefault((name, datasets[i]), []).append((pred, batch.targets[i]))
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "data": data if isinstance(data, str) else "spec", "split": split,
                              "tasks": {}, "datasets": {}, "items": {}}
    for task in model.task_names:
        keys = sorted(d for t, d in groups if t == task)
        if not keys:
            continue
        head = model.heads[task]
        everything = [pair for d in keys for pair in groups[(task, d)]]
        report["tasks"][task] = _metrics(head, everything, model.device)
        report["items"][task] = len(everything)
        if len(keys) > 1:
            report["datasets"][task] = {d: {**_metrics(head, groups[(task, d)], model.device), "items": len(groups[(task, d)])} for d in keys}
    return report


def _corpus_model(model: Any) -> bool:
    from ..data.corpus.make import CORPUS_TASKS

    return set(model.task_names) <= set(CORPUS_TASKS)


def _metrics(head: Any, pairs: Sequence[tuple[Any, Any]], device: torch.device) -> dict[str, float]:
    preds = _merge([p for p, _ in pairs])
    try:
        return {k: round(float(v), 6) for k, v in head.metrics(preds, head.make_targets([t for _, t in pairs], device)).items()}
    except NotImplementedError:
        return {}


def format_report(report: dict[str, Any]) -> str:
    """The report as text tables: one row per task, then one per (task, dataset) when there are several."""
    names = sorted({k for m in report["tasks"].values() for k in m})
    head = ["task", "items"] + names
    rows = [[t, str(report["items"][t])] + [f"{m[k]:.4f}" if k in m else "-" for k in names] for t, m in report["tasks"].items()]
    text = _table(rows, head)
    if report["datasets"]:
        drows = [[t, d, str(m["items"])] + [f"{m[k]:.4f}" if k in m else "-" for k in names] for t, per in report["datasets"].items() for d, m in per.items()]
        text += "\n\nper dataset:\n" + _table(drows, ["task", "dataset", "items"] + names)
    return text


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows])


def write_report(report: dict[str, Any], path: str) -> None:
    """Write the report as JSON (atomically)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmp, path)
