"""The training loop behind ``audiomoe train``: AdamW, progress bar, periodic eval, atomic checkpoints (see ``checkpoint.py``)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..core.composer import compose
from ..core.errors import AudioMoEError
from ..data.synthetic import classification_tasks, tone_batch, tone_stream
from ..model import AudioBatch
from .checkpoint import save_checkpoint


@dataclass
class TrainConfig:
    """Knobs of the training loop."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    eval_every: int = 50
    eval_batches: int = 4
    out_dir: Optional[str] = None
    keep: int = 2
    seed: int = 0
    progress: bool = True


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[AudioBatch]) -> dict[str, float]:
    """Mean of every head's metrics over ``batches``, as ``{"<task>/<metric>": value}``."""
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        out = model(AudioBatch(batch.waveforms, batch.sample_rate, batch.tasks, batch.lengths, None))
        for name, preds in out.predictions.items():
            idx = out.indices[name].tolist()
            head = model.heads[name]
            targets = head.make_targets([batch.targets[i] for i in idx], model.device)
            for k, v in head.metrics(preds, targets).items():
                sums[f"{name}/{k}"] = sums.get(f"{name}/{k}", 0.0) + float(v)
                counts[f"{name}/{k}"] = counts.get(f"{name}/{k}", 0) + 1
    model.train()
    return {k: sums[k] / counts[k] for k in sorted(sums)}


def train(
    preset: Any,
    overrides: Sequence[str] = (),
    config: Optional[TrainConfig] = None,
    data: Optional[Iterator[AudioBatch]] = None,
    eval_data: Optional[Sequence[AudioBatch]] = None,
) -> dict[str, Any]:
    """Compose ``preset`` and train it; without ``data``, on synthetic tones (classification heads).

    Returns a summary: steps, final loss, eval metrics before and after, checkpoint path, time.
    """
    cfg = config or TrainConfig()
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise AudioMoEError(f"steps ({cfg.steps}) and batch_size ({cfg.batch_size}) must be >= 1")
    model = compose(preset, overrides)
    sr = int(model.encoder.sample_rate)
    if data is None:
        tasks = classification_tasks(model, model.task_names)
        if not tasks:
            raise AudioMoEError(
                "the synthetic task only feeds single-label classification heads, and this model has none; "
                "pass your own batches with audiomoe.train.train(..., data=...)"
            )
        data = tone_stream(tasks, cfg.batch_size, sr, seed=cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed + 10_000)
        eval_data = [tone_batch(tasks, cfg.batch_size, sr, generator=g) for _ in range(cfg.eval_batches)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    before = evaluate(model, eval_data) if eval_data else {}
    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    ckpt: Optional[Path] = None
    loss_value = float("nan")
    bar = tqdm(range(1, cfg.steps + 1), desc="train", disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        batch = next(data)
        out = model(batch)
        if out.loss is None:
            raise AudioMoEError("training batches must carry targets")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        loss_value = float(out.loss.detach())
        if not torch.isfinite(torch.tensor(loss_value)):
            raise AudioMoEError(f"loss became {loss_value} at step {step}; lower the learning rate (lr={cfg.lr})")
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if eval_data and (step % cfg.eval_every == 0 or step == cfg.steps):
            metrics = evaluate(model, eval_data)
            history.append({"step": step, "loss": loss_value, **metrics})
            if cfg.out_dir:
                ckpt = save_checkpoint(model, cfg.out_dir, step, opt, cfg.keep)
    if cfg.out_dir and ckpt is None:
        ckpt = save_checkpoint(model, cfg.out_dir, cfg.steps, opt, cfg.keep)
    result = {
        "steps": cfg.steps,
        "final_loss": loss_value,
        "eval_before": before,
        "eval_after": history[-1] if history else {},
        "checkpoint": str(ckpt) if ckpt else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "config": asdict(cfg),
    }
    if cfg.out_dir:
        Path(cfg.out_dir, "summary.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
