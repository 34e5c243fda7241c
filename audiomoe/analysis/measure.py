"""Per-run measurements after training: load the checkpoint, run held-out batches, write ``measure.json``.

``python -m audiomoe.analysis.measure RUN_DIR [--batches N]`` (what the ablation runner starts after
each training run, as its own process). ``RUN_DIR`` is an ablation run directory (training output
in ``RUN_DIR/train``) or a training run directory itself (``audiomoe train --out``).

Held-out data is what the run's training evaluated on, made by the trainer's own public
:func:`audiomoe.train.data.build_data` with the run's data, batch size and seed (read from the
recipe in ``run.json``, else the summary's config): the first ``N`` of the trainer's eval batches
(the built-in corpus' or the manifest's ``test`` split for the model's tasks, or seeded tone
batches); see :func:`heldout_batches`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from audiomoe.core.atomic import write_text
from audiomoe.core.errors import AudioMoEError
from audiomoe.train.heldout import HELDOUT_FILE, MAX_PER_TASK, flat_metrics

MEASURE_FILE = "measure.json"
#: bumped when what a measurement holds changes (2: decoder-writing heads measured teacher-forced; 3: the whole
#: held-out split scored item by item), so older files are redone
MEASURE_VERSION = 3


def measure_is_current(measure: Optional[dict[str, Any]], summary: dict[str, Any]) -> bool:
    """Whether a stored measurement is of this version and of the run's final checkpoint (not one before a resume)."""
    return (
        bool(measure)
        and measure.get("version") == MEASURE_VERSION
        and measure.get("checkpoint") == str(summary.get("checkpoint"))
    )


def train_dir(run_dir: str | Path) -> Path:
    """The training run directory inside ``run_dir`` (``run_dir/train`` for ablation runs, else ``run_dir``)."""
    p = Path(run_dir)
    return p / "train" if (p / "train" / "summary.json").is_file() or (p / "train" / "run.json").is_file() else p


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``summary.json`` (a clear error when training has not finished there)."""
    path = train_dir(run_dir) / "summary.json"
    if not path.is_file():
        raise AudioMoEError(
            f"'{run_dir}' has no summary.json: the run did not finish; train it (audiomoe train ... --out DIR) or rerun the ablation"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AudioMoEError(f"'{path}' is not valid JSON ({exc}); rerun that run") from None


def run_settings(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``data``, ``seed`` and ``batch_size``: its recipe in ``run.json`` (what the trainer used), else the summary's config."""
    tdir = train_dir(run_dir)
    try:
        recipe = json.loads((tdir / "run.json").read_text(encoding="utf-8")).get("recipe") or {}
    except (OSError, ValueError):
        recipe = {}
    config: dict[str, Any] = {}
    if (tdir / "summary.json").is_file():
        config = dict(read_summary(run_dir).get("config") or {})
    out = {k: config[k] for k in ("data", "seed", "batch_size") if config.get(k) is not None}
    out.update({k: recipe[k] for k in ("data", "seed", "batch_size") if recipe.get(k) is not None})
    return out


def heldout_batches(model: Any, config: dict[str, Any], n: int) -> tuple[list[Any], str]:
    """The first ``n`` of the trainer's eval batches for ``model`` under ``config`` (data, seed, batch_size); returns ``(batches, data name)``."""
    from audiomoe.train.data import build_data, resolve_choice

    choice = config.get("data", "auto")
    if isinstance(choice, str) and choice not in ("auto", "builtin", "tones") and not os.path.isfile(choice):
        raise AudioMoEError(f"the run's data '{choice}' is no longer a file; measure it with --data PATH")
    resolved = resolve_choice(model, choice)
    _, batches = build_data(
        model,
        resolved,
        None,
        batch_size=int(config.get("batch_size", 16)),
        seed=int(config.get("seed", 0)),
        eval_batches=n,
        workers=0,
    )
    if not batches:
        raise AudioMoEError(f"no held-out batches for tasks {model.task_names} in the run's data '{choice}'")
    return batches, resolved if isinstance(resolved, str) else "data spec"


def score_heldout(model: Any, config: dict[str, Any], max_per_task: Optional[int]) -> Optional[dict[str, Any]]:
    """The run's whole held-out split scored item by item (:mod:`audiomoe.train.heldout`); None for tone data."""
    from audiomoe.train.heldout import heldout_items, score_model

    items = heldout_items(model, config.get("data", "auto"))
    if items is None:
        return None
    return score_model(model, items, max_per_task=max_per_task, batch_size=int(config.get("batch_size", 16)))


def _trained_scores(run_dir: Path, summary: dict[str, Any], max_per_task: Optional[int]) -> Optional[dict[str, Any]]:
    """The whole-split scores training wrote for its final checkpoint (``train`` scores it at the end), if they match."""
    held = summary.get("heldout") or {}
    path = train_dir(run_dir) / HELDOUT_FILE
    if not held.get("tasks") or not path.is_file() or path.resolve() == (Path(run_dir) / HELDOUT_FILE).resolve():
        return None
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return scores if scores.get("max_per_task") == max_per_task and scores.get("tasks") else None


def measure_run(
    run_dir: str | Path,
    batches: int = 4,
    checkpoint: Optional[str] = None,
    data: Optional[str] = None,
    max_per_task: Optional[int] = MAX_PER_TASK,
) -> dict[str, Any]:
    """Measure one run (its ``checkpoint`` or the run's latest): routing on ``batches`` held-out batches, quality on the
    whole held-out split (up to ``max_per_task`` items per task); write ``measure.json`` and ``heldout.json``."""
    import torch

    from audiomoe.analysis.routing_stats import measure_model
    from audiomoe.train.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    summary = read_summary(run_dir) if checkpoint is None else {}
    ckpt = checkpoint or summary.get("checkpoint")
    if not ckpt:
        raise AudioMoEError(f"'{run_dir}' records no checkpoint; train with --out so that checkpoints are written")
    config = run_settings(run_dir) if checkpoint is None else {}
    if data:
        config["data"] = data
    torch.manual_seed(0)
    model = load_checkpoint(ckpt)
    held, data_name = heldout_batches(model, config, batches)
    out = measure_model(model, held)
    scores = _trained_scores(run_dir, summary, max_per_task) if checkpoint is None and not data else None
    scores = scores or score_heldout(model, config, max_per_task)
    if scores is not None:  # per-item outcomes beside the measurement: studies pair runs item by item
        write_text(run_dir / HELDOUT_FILE, json.dumps(scores, indent=1), what="held-out scores")
        out["heldout"] = {
            "split": scores["split"],
            "metrics": flat_metrics(scores),
            "tasks": {
                t: {k: v for k, v in r.items() if k not in ("per_item", "item_ids")} for t, r in scores["tasks"].items()
            },
        }
    out.update(
        {
            "version": MEASURE_VERSION,
            "checkpoint": str(ckpt),
            "data": data_name,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    write_text(run_dir / MEASURE_FILE, json.dumps(out, indent=1), what="measurements")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m audiomoe.analysis.measure RUN_DIR [--batches N]``: exit 0 on success, 2 with a message on error."""
    p = argparse.ArgumentParser(prog="python -m audiomoe.analysis.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--batches", type=int, default=4, help="held-out batches of the routing pass [4]")
    p.add_argument("--checkpoint", default=None, help="measure this checkpoint instead of the run's last")
    p.add_argument("--data", default=None, help="held-out data instead of the run's (builtin, tones, a manifest)")
    p.add_argument(
        "--max-per-task", type=int, default=MAX_PER_TASK, help=f"held-out items scored per task [{MAX_PER_TASK}]"
    )
    args = p.parse_args(argv)
    if args.batches < 1 or args.max_per_task < 1:
        print("measure: error: --batches and --max-per-task must be >= 1", file=sys.stderr)
        return 2
    try:
        out = measure_run(args.run_dir, args.batches, args.checkpoint, args.data, args.max_per_task)
    except AudioMoEError as exc:
        print(f"measure: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: out[k] for k in ("params_total", "params_active", "moe_mflops_per_audio_s", "seconds")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
