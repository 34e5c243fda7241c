"""Per-run measurements after training: load the checkpoint, run held-out batches, write ``measure.json``.

``python -m audiomoe.analysis.measure RUN_DIR [--batches N]`` (what the ablation runner starts after
each training run, as its own process). ``RUN_DIR`` is an ablation run directory (training output
in ``RUN_DIR/train``) or a training run directory itself (``audiomoe train --out``).

Held-out data is what the run's training evaluated on: the built-in corpus' ``test`` split for the
model's tasks (or the run's manifest), at the run's batch size and seed, or, for tone data, seeded
tone batches; see :func:`heldout_batches`. It mirrors the trainer's eval data; issue 15's trainer is
expected to expose that as a public function, and this should then call it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.errors import AudioMoEError

MEASURE_FILE = "measure.json"


def train_dir(run_dir: str | Path) -> Path:
    """The training run directory inside ``run_dir`` (``run_dir/train`` for ablation runs, else ``run_dir``)."""
    p = Path(run_dir)
    return p / "train" if (p / "train" / "summary.json").is_file() or (p / "train" / "run.json").is_file() else p


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``summary.json`` (a clear error when training has not finished there)."""
    path = train_dir(run_dir) / "summary.json"
    if not path.is_file():
        raise AudioMoEError(f"'{run_dir}' has no summary.json: the run did not finish; train it (audiomoe train ... --out DIR) or rerun the ablation")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise AudioMoEError(f"'{path}' is not valid JSON ({exc}); rerun that run") from None


def heldout_batches(model: Any, config: dict[str, Any], n: int) -> tuple[list[Any], str]:
    """``n`` held-out batches for ``model`` under the run's training ``config``; returns ``(batches, data name)``."""
    import torch

    from ..data.corpus.make import UNDERSTANDING_TASKS

    choice = config.get("data", "auto")
    seed, bs = int(config.get("seed", 0)), int(config.get("batch_size", 16))
    if choice == "auto":
        choice = "builtin" if set(model.task_names) <= set(UNDERSTANDING_TASKS) else "tones"
    sr = int(model.encoder.sample_rate)
    if choice == "tones":
        from ..data.synthetic import classification_tasks, tone_batch

        tasks = classification_tasks(model, model.task_names)
        if not tasks:
            raise AudioMoEError("the run trained on tones but the model has no single-label classification head to make tones for")
        g = torch.Generator().manual_seed(seed + 10_000)  # the trainer's eval generator: the same eval batches
        return [tone_batch(tasks, bs, sr, generator=g) for _ in range(n)], "tones"
    from ..data import build_loader, builtin_corpus

    path = str(builtin_corpus(progress=False)) if choice == "builtin" else choice
    if not os.path.isfile(path):
        raise AudioMoEError(f"the run's data '{choice}' is no longer a file; measure it with --data PATH")
    spec = {"sources": {"data": {"path": path, "split": "test", "only_tasks": list(model.task_names)}}, "max_seconds": 3.0 * bs,
            "max_items": bs, "max_clip_seconds": 5.0, "num_workers": 0, "seed": seed, "sample_rate": sr}  # fmt: skip
    batches = list(itertools.islice(iter(build_loader(spec)), n))
    if not batches:
        raise AudioMoEError(f"no held-out batches for tasks {model.task_names} in '{path}'")
    return batches, "builtin" if choice == "builtin" else path


def measure_run(run_dir: str | Path, batches: int = 4, checkpoint: Optional[str] = None, data: Optional[str] = None) -> dict[str, Any]:
    """Measure one run (its ``checkpoint`` or the run's latest) on ``batches`` held-out batches; write ``measure.json``."""
    import torch

    from ..train.checkpoint import load_checkpoint
    from .routing_stats import measure_model

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    summary = read_summary(run_dir) if checkpoint is None else {}
    ckpt = checkpoint or summary.get("checkpoint")
    if not ckpt:
        raise AudioMoEError(f"'{run_dir}' records no checkpoint; train with --out so that checkpoints are written")
    config = dict(summary.get("config") or {})
    if data:
        config["data"] = data
    torch.manual_seed(0)
    model = load_checkpoint(ckpt)
    held, data_name = heldout_batches(model, config, batches)
    out = measure_model(model, held)
    out.update({"checkpoint": str(ckpt), "data": data_name, "seconds": round(time.perf_counter() - t0, 2)})
    tmp = run_dir / f".{MEASURE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(out, indent=1), encoding="utf-8")
    os.replace(tmp, run_dir / MEASURE_FILE)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m audiomoe.analysis.measure RUN_DIR [--batches N]``: exit 0 on success, 2 with a message on error."""
    p = argparse.ArgumentParser(prog="python -m audiomoe.analysis.measure", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--batches", type=int, default=4, help="held-out batches of the routing pass [4]")
    p.add_argument("--checkpoint", default=None, help="measure this checkpoint instead of the run's last")
    p.add_argument("--data", default=None, help="held-out data instead of the run's (builtin, tones, a manifest)")
    args = p.parse_args(argv)
    if args.batches < 1:
        print("measure: error: --batches must be >= 1", file=sys.stderr)
        return 2
    try:
        out = measure_run(args.run_dir, args.batches, args.checkpoint, args.data)
    except AudioMoEError as exc:
        print(f"measure: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: out[k] for k in ("params_total", "params_active", "moe_mflops_per_audio_s", "seconds")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
