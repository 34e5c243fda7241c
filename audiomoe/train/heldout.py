"""Held-out scoring that can rank two models: every item of a split (up to a cap per task), scored one by one.

A metric that ranks models must be known to within a few points. With ``n`` items a task's accuracy
has a standard error of ``sqrt(p (1 - p) / n)``: 0.06 at 64 items, 0.035 at 200. So the score of a
run is computed on the whole held-out split (the first ``max_per_task`` items of each task, the
same items for every run), never on a few batches, and every task's number comes with

- ``items``: how many items it was scored on;
- an interval: Wilson's 95% score interval for accuracies (never outside [0, 1]);
- ``chance``: the accuracy of always answering the most frequent label of the scored items (at
  least ``1 / num_classes``), the bar a model must clear to have learned anything;
- per-item outcomes (``correct`` for single-label classification, else the head's metrics on that
  item alone), stored so a study can pair two models item by item.

Batches here are a device convenience: metrics are computed once over all of a task's items (so
macro-F1 and WER are corpus-level), and the item order is fixed (task, then manifest order).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

from audiomoe.core.errors import AudioMoEError

if TYPE_CHECKING:
    import torch

#: items per task scored by default: a task's accuracy then has a standard error of at most 0.035
MAX_PER_TASK = 200
#: items per task for heads whose predictions are generated token by token (text, codec codes): each costs a
#: whole decoding, so these get a sample, labelled by its item count, not the whole split
MAX_GENERATED_PER_TASK = 16
#: per-item outcomes of the whole held-out split, beside a run's summary (and a study run's measure.json)
HELDOUT_FILE = "heldout.json"
Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``correct / n`` (inside [0, 1] by construction)."""
    if n <= 0:
        return math.nan, math.nan
    p = correct / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # at 0 or n correct the bound is exactly 0 (1); floating point would leave ~1e-17 on the wrong side of p
    lo = 0.0 if correct <= 0 else max(0.0, centre - half)
    hi = 1.0 if correct >= n else min(1.0, centre + half)
    return lo, hi


def pick_items(items: Sequence[Any], max_per_task: Optional[int], caps: Optional[dict[str, int]] = None) -> list[Any]:
    """The first ``max_per_task`` items of every task (``caps[task]`` where given), in manifest order (the same items
    for every model)."""
    per_task: dict[str, list[Any]] = {}
    for it in items:
        per_task.setdefault(it.task, []).append(it)
    out = []
    for task, its in per_task.items():
        cap = (caps or {}).get(task, max_per_task)
        out += its[:cap] if cap else its
    return out


def _single_label(head: Any) -> bool:
    params = getattr(head, "params", None)
    return hasattr(params, "num_classes") and not getattr(params, "multi_label", False)


def predict_items(
    model: Any, items: Sequence[Any], batch_size: int = 16, max_seconds: float = 30.0, command: str = "eval"
) -> dict[str, list[tuple[Any, Any, Any]]]:
    """``{task: [(prediction, target, item), ...]}`` for ``items`` in their order (clip-level heads cropped, others whole;
    a longer clip of any other head is refused by name, see :func:`audiomoe.train.longaudio.refuse_long_clips`)."""
    import torch

    from audiomoe.core.batch import AudioBatch
    from audiomoe.data.loader import ItemDataset, collate
    from audiomoe.train.longaudio import clip_level_tasks, item_clips, refuse_long_clips

    sr = int(model.encoder.sample_rate)
    refuse_long_clips(model, item_clips(items), max_seconds, command)
    ds = ItemDataset(list(items), sr, max_clip_seconds=max_seconds, crop_tasks=clip_level_tasks(model))
    # batches of like length (less padding: 6.3 -> 6.0 s on the corpus's split), results in (task, item) order
    order = sorted(range(len(items)), key=lambda i: (items[i].task, items[i].duration or 0.0, i))
    found: dict[str, list[tuple[int, tuple[Any, Any, Any]]]] = {}
    was_training, had_grad = model.training, torch.is_grad_enabled()
    model.eval()
    try:
        torch.set_grad_enabled(False)
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            batch, bad = collate([ds[(i, 0)] for i in chunk], sr)  # ds[...] also loads codec codes
            if batch is None or bad:
                raise AudioMoEError(f"cannot score the held-out items: {'; '.join(bad)}")
            res = model(AudioBatch(batch.waveforms, batch.sample_rate, batch.tasks, batch.lengths, None, batch.prompts))
            for name, preds in res.predictions.items():
                for j, i in enumerate(res.indices[name].tolist()):
                    pred = preds[j : j + 1].cpu() if isinstance(preds, torch.Tensor) else [preds[j]]
                    found.setdefault(name, []).append((chunk[i], (pred, batch.targets[i], items[chunk[i]])))
    finally:
        torch.set_grad_enabled(had_grad)
        model.train(was_training)
    return {name: [r for _, r in sorted(rows, key=lambda x: (items[x[0]].task, x[0]))] for name, rows in found.items()}


def _merge(parts: list[Any]) -> Any:
    import torch

    if parts and all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    return [x for p in parts for x in p]


def task_metrics(head: Any, pairs: Sequence[tuple[Any, ...]], device: "torch.device") -> dict[str, float]:
    """A head's metrics over all of ``pairs`` at once (corpus-level macro-F1, WER, ...); {} when it has none."""
    try:
        got = head.metrics(_merge([p[0] for p in pairs]), head.make_targets([p[1] for p in pairs], device))
    except NotImplementedError:
        return {}
    return {k: round(float(v), 6) for k, v in got.items()}


def score_task(head: Any, pairs: Sequence[tuple[Any, ...]], device: "torch.device") -> dict[str, Any]:
    """One task's corpus-level metrics, item count, interval, chance and per-item outcomes."""
    res: dict[str, Any] = {"metrics": task_metrics(head, pairs, device), "items": len(pairs)}
    if _single_label(head):
        import torch

        targets = head.make_targets([p[1] for p in pairs], device).cpu().view(-1)
        preds = _merge([p[0] for p in pairs]).view(-1).to(targets.device)
        correct = (preds == targets).tolist()
        k = int(sum(correct))
        res["metrics"]["accuracy"] = round(
            k / len(correct), 6
        )  # the same number as the head's, from the stored outcomes
        res["interval"] = {"accuracy": list(wilson_interval(k, len(correct)))}
        counts = torch.bincount(targets, minlength=int(head.params.num_classes))
        res["chance"] = {
            "accuracy": round(max(float(counts.max()) / len(correct), 1.0 / int(head.params.num_classes)), 6)
        }
        res["per_item"] = [int(c) for c in correct]
    else:
        res["per_item"] = [task_metrics(head, [pair], device) for pair in pairs]
    return res


def score_model(
    model: Any,
    items: Sequence[Any],
    *,
    split: str = "test",
    max_per_task: Optional[int] = MAX_PER_TASK,
    batch_size: int = 16,
    max_seconds: float = 30.0,
    max_generated: int = MAX_GENERATED_PER_TASK,
) -> dict[str, Any]:
    """Score ``model`` on the held-out ``items`` (capped per task): ``{"split", "max_per_task", "tasks": {task: ...}}``.

    Each task holds ``metrics``, ``items``, and for single-label heads ``interval``, ``chance`` and
    ``per_item`` correctness (0/1 in the fixed item order); the ``mean`` entry averages every task's
    metric of the same name (``mean/accuracy``).
    """
    costly = {t: max_generated for t in model.task_names if not getattr(model.heads[t], "predicts_cheaply", True)}
    chosen = pick_items(items, max_per_task, costly)
    if not chosen:
        raise AudioMoEError(f"no '{split}' items to score for tasks {list(model.task_names)}")
    pairs = predict_items(model, chosen, batch_size=batch_size, max_seconds=max_seconds)
    tasks = {t: score_task(model.heads[t], pairs[t], model.device) for t in model.task_names if pairs.get(t)}
    for t, res in tasks.items():
        res["item_ids"] = [str(p[2].origin) for p in pairs[t]]
    return {"split": split, "max_per_task": max_per_task, "max_generated": max_generated, "tasks": tasks}


def flat_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` plus ``mean/<m>`` and ``worst/<m>`` over tasks, as the study tables read them."""
    out = {f"{t}/{k}": v for t, res in scores["tasks"].items() for k, v in res["metrics"].items()}
    by_name: dict[str, list[float]] = {}
    for k, v in out.items():
        by_name.setdefault(k.split("/", 1)[1], []).append(v)
    for m, vs in by_name.items():
        if len(vs) > 1:
            out[f"mean/{m}"], out[f"worst/{m}"] = sum(vs) / len(vs), min(vs)
    return out


def summary_table(scores: dict[str, Any]) -> str:
    """A plain-text table: task, items, metric, 95% interval, chance and whether the interval clears chance."""
    rows = [["task", "items", "accuracy", "95% interval", "chance", "above chance"]]
    for t, res in scores["tasks"].items():
        m = res["metrics"]
        if "accuracy" in res.get("interval", {}):
            lo, hi = res["interval"]["accuracy"]
            ch = res["chance"]["accuracy"]
            rows.append(
                [
                    t,
                    str(res["items"]),
                    f"{m['accuracy']:.3f}",
                    f"[{lo:.3f}, {hi:.3f}]",
                    f"{ch:.3f}",
                    "yes" if lo > ch else "no",
                ]
            )
        else:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(m.items()))
            rows.append([t, str(res["items"]), shown or "–", "", "", ""])
    from audiomoe.train.evaluate import _table  # the one text-table layout of eval and train output

    return _table(rows[1:], rows[0])


def heldout_items(model: Any, data: Any, split: str = "test") -> Optional[list[Any]]:
    """The held-out items of a run's data choice for the model's tasks (None for generated tones: no fixed split)."""
    from audiomoe.train.data import resolve_choice
    from audiomoe.train.evaluate import _items

    choice = resolve_choice(model, data)
    if isinstance(choice, str) and choice == "tones":
        return None
    return _items(model, choice, split)


def final_score(model: Any, recipe: Any, root: Optional[Any], bar: Any = None) -> Optional[dict[str, Any]]:
    """A finished run's whole held-out split (``recipe.eval.max_per_task`` items per task), written to ``root/heldout.json``
    with per-item outcomes; returns the summary's ``heldout`` entry (no per-item lists), or None for tone data."""
    import json
    from pathlib import Path

    try:
        items = heldout_items(model, recipe.data)
    except AudioMoEError as exc:  # no test split in the user's data: the run is still good, the summary says why
        return {"skipped": str(exc)}
    if items is None:
        return None
    if bar is not None:
        bar.note(
            f"scoring the whole held-out split (up to {recipe.eval.max_per_task} items per task, "
            f"{recipe.eval.max_generated_per_task} for generating heads)"
        )
    scores = score_model(
        model,
        items,
        max_per_task=recipe.eval.max_per_task,
        batch_size=recipe.batch_size,
        max_generated=recipe.eval.max_generated_per_task,
    )
    if root is not None:
        from audiomoe.core.atomic import write_text

        write_text(Path(root) / HELDOUT_FILE, json.dumps(scores, indent=1), what="held-out scores")
    return {
        "split": scores["split"],
        "metrics": flat_metrics(scores),
        "tasks": {
            t: {k: v for k, v in r.items() if k not in ("per_item", "item_ids")} for t, r in scores["tasks"].items()
        },
    }


def run_summary_text(summary: dict[str, Any], out: Optional[str] = None) -> str:
    """What ``audiomoe train`` prints at the end: the run in a few lines and its held-out score per task."""
    lines = [
        f"trained {summary.get('steps')} steps in {summary.get('seconds', 0):.0f} s; final training loss "
        f"{summary.get('final_loss', float('nan')):.4f}"
    ]
    if summary.get("skipped_steps"):
        lines.append(f"skipped {summary['skipped_steps']} optimizer steps with a NaN/inf gradient norm")
    held = summary.get("heldout")
    if held and "tasks" in held:
        lines += [
            "",
            f"held-out score on the '{held['split']}' split, item by item (chance: always the most frequent label; "
            "a generating head is scored on a sample, see items):",
            summary_table(held),
        ]
        if "mean/accuracy" in held["metrics"]:
            lines.append(f"mean accuracy over tasks: {held['metrics']['mean/accuracy']:.3f}")
    elif held and "skipped" in held:
        lines.append(f"no held-out score: {held['skipped']}")
    if summary.get("warnings"):
        lines.append(f"{len(summary['warnings'])} warning(s): see summary.json")
    if summary.get("checkpoint"):
        lines.append(f"checkpoint: {summary['checkpoint']}")
    if out:
        lines.append(f"run directory: {out} (summary.json, heldout.json, log.jsonl; audiomoe report {out})")
    return "\n".join(lines)
