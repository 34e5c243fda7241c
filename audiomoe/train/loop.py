"""The training loop behind ``audiomoe train``: AdamW, progress, periodic eval, atomic checkpoints, resume.

Seeds: the spec's ``seed`` fixes the *initial parameters* (composing a spec twice gives the same
model); ``TrainConfig.seed`` (``train --seed``) fixes everything the run draws: the synthetic data
stream, the eval batches and the global torch RNG during training (dropout, router jitter,
random routers). Same spec + same options = the same run; a resumed run restores the RNG and
replays the data stream to the step it stopped at, so it continues as if never stopped.

Every option is checked before anything is built (:meth:`TrainConfig.check`), the run directory
is created, locked and checked before training starts (``rundir.py``), and a model whose heads the
data cannot feed is refused instead of training a subset of its heads.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from ..core.composer import build_meta, build_model, check_size, resolve
from ..core.errors import AudioMoEError
from ..core.limits import MAX_BATCH_SIZE, MAX_LR, MAX_SEED, MAX_STEPS
from ..data.synthetic import classification_tasks, tone_batch, tone_stream
from ..model import AudioBatch
from .checkpoint import load_checkpoint, load_trainer_state, read_latest, save_checkpoint
from .progress import Progress
from .rundir import RunDir, open_run_dir


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``checkpoint`` is the last good checkpoint (``None`` if none was written)."""

    def __init__(self, step: int, checkpoint: Optional[Path]) -> None:
        self.step, self.checkpoint = step, checkpoint
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"interrupted at step {step}; {where}")


@dataclass
class TrainConfig:
    """Knobs of the training loop (``audiomoe train --help`` describes each)."""

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
    save_every: int = 0
    log_every: int = 0
    resume: bool = False
    overwrite: bool = False
    data: str = "auto"

    _INT_RANGES = {
        "steps": (1, MAX_STEPS), "batch_size": (1, MAX_BATCH_SIZE), "eval_every": (1, MAX_STEPS),
        "eval_batches": (0, 1000), "keep": (0, 1000), "seed": (0, MAX_SEED), "save_every": (0, MAX_STEPS),
        "log_every": (0, MAX_STEPS),
    }

    def problems(self) -> list[str]:
        """Every bad option, as ``"name (value) must ..."``."""
        out = []
        for name, (lo, hi) in self._INT_RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                out.append(f"{name} ({v!r}) must be an integer in [{lo}, {hi}]")
        for name, lo_open, hi in (("lr", True, MAX_LR), ("weight_decay", False, 1.0)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= hi
            if not ok or (v <= 0 if lo_open else v < 0):
                out.append(f"{name} ({v!r}) must be a finite number in {'(0' if lo_open else '[0'}, {hi}]")
        if self.resume and self.overwrite:
            out.append("resume and overwrite exclude each other (continue a run, or delete it)")
        if (self.resume or self.overwrite) and not self.out_dir:
            out.append("resume / overwrite need out_dir (--out), the run directory")
        return out

    def check(self) -> None:
        """Raise :class:`AudioMoEError` listing every bad option (before anything is built)."""
        bad = self.problems()
        if bad:
            raise AudioMoEError("bad training options: " + "; ".join(bad))


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


def _memory_check(n_params: int) -> None:
    """Refuse a model whose weights + grads + AdamW moments exceed this machine's memory."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return
    need = n_params * 4 * 4
    if need > ram:
        raise AudioMoEError(
            f"training {n_params:,} parameters needs about {need / 2**30:,.1f} GiB (weights, gradients, AdamW state) "
            f"but this machine has {ram / 2**30:,.1f} GiB; use a smaller spec"
        )


def _head_kind(model: Any, name: str) -> str:
    info = getattr(model.heads[name], "audiomoe_component", None)
    kind = info.name if info is not None else type(model.heads[name]).__name__
    return kind + (", multi-label" if getattr(getattr(model.heads[name], "params", None), "multi_label", False) else "")


def _default_data(model: Any, cfg: TrainConfig) -> tuple[Iterator[AudioBatch], list[AudioBatch]]:
    """The data used when none is passed, by ``cfg.data``: ``builtin`` (the built-in corpus, made once
    into the cache), ``tones`` (synthetic pitch classes), a manifest path, or ``auto``: the corpus
    when every head is named after one of its tasks, else tones."""
    from ..data.corpus.make import UNDERSTANDING_TASKS

    choice = cfg.data
    if choice == "auto":
        choice = "builtin" if set(model.task_names) <= set(UNDERSTANDING_TASKS) else "tones"
    if choice == "tones":
        return _synthetic(model, cfg)
    if choice != "builtin" and not os.path.isfile(choice):
        raise AudioMoEError(f"--data {choice!r} is not 'auto', 'builtin', 'tones' or an existing manifest (.jsonl) file")
    return _manifest_data(model, cfg, None if choice == "builtin" else choice)


def _manifest_data(model: Any, cfg: TrainConfig, manifest: Optional[str]) -> tuple[Iterator[AudioBatch], list[AudioBatch]]:
    """Train split as an endless stream, ``eval_batches`` of the test split, for the model's tasks only."""
    from ..data import build_loader, builtin_corpus

    path = str(manifest or builtin_corpus(progress=cfg.progress))
    tasks = list(model.task_names)

    def spec(split: str, workers: int) -> dict[str, Any]:
        source = {"path": path, "split": split, "only_tasks": tasks}
        return {"sources": {"data": source}, "max_seconds": 3.0 * cfg.batch_size, "max_items": cfg.batch_size,
                "max_clip_seconds": 5.0, "num_workers": workers, "seed": cfg.seed, "sample_rate": int(model.encoder.sample_rate)}  # fmt: skip

    eval_data = list(itertools.islice(iter(build_loader(spec("test", 0))), cfg.eval_batches))
    return _LoaderStream(build_loader(spec("train", 1))), eval_data


class _LoaderStream:
    """Endless batches of a loader that can still report its :meth:`summary` (for the run's summary)."""

    def __init__(self, loader: Any) -> None:
        self.loader, self._it = loader, loader.stream()

    def __iter__(self) -> "_LoaderStream":
        return self

    def __next__(self) -> AudioBatch:
        return next(self._it)

    def summary(self) -> dict[str, Any]:
        """The loader's counts: items, hours, bad items skipped."""
        return self.loader.summary()

    def state_dict(self) -> dict[str, int]:
        """The sampler position (what a checkpoint saves, so a resumed run sees the same batches)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position (before the first batch is drawn)."""
        self.loader.load_state_dict(state)


def _synthetic(model: Any, cfg: TrainConfig) -> tuple[Iterator[AudioBatch], list[AudioBatch]]:
    tasks = classification_tasks(model, model.task_names)
    unfed = [n for n in model.task_names if n not in tasks]
    if unfed:
        heads = ", ".join(f"'{n}' ({_head_kind(model, n)})" for n in unfed)
        drop = " ".join(f"--set tasks.{n}=null" for n in unfed)
        raise AudioMoEError(
            f"the built-in synthetic data feeds only single-label classification heads; head(s) {heads} "
            f"would never train. Train this model on your own batches (audiomoe.train.train(..., data=...)), "
            f"or drop those heads ({drop})"
        )
    sr = int(model.encoder.sample_rate)
    g = torch.Generator().manual_seed(cfg.seed + 10_000)
    eval_data = [tone_batch(tasks, cfg.batch_size, sr, generator=g) for _ in range(cfg.eval_batches)]
    return tone_stream(tasks, cfg.batch_size, sr, seed=cfg.seed), eval_data


def _build(preset: Any, overrides: Sequence[str], run: Optional[RunDir], cfg: TrainConfig, synthetic: bool) -> tuple[Any, Any]:
    """The model to train (composed from ``preset``, or the run's checkpoint) and the synthetic data, if used.

    A new model is first built on the meta device: its size and its heads are checked before any
    parameter memory is allocated.
    """
    if run is not None and run.resume_from is not None:
        model = load_checkpoint(run.resume_from)
        if preset is not None and resolve(preset, overrides).to_dict() != model.spec:
            raise AudioMoEError(
                f"'{run.path}' was trained from a different spec than {preset!r} with these --set overrides; "
                "resume without PRESET/--set to continue it, or use --overwrite to start over"
            )
        return model, _default_data(model, cfg) if synthetic else None
    if preset is None:
        preset = (run.info.get("spec") if run is not None else None)
        if preset is None:
            raise AudioMoEError("give a preset or spec to train (or --resume a run directory that has one)")
        overrides = ()
    resolved = resolve(preset, overrides)
    meta = build_meta(resolved)
    _memory_check(check_size(meta))
    streams = _default_data(meta, cfg) if synthetic else None  # refuses heads it cannot feed
    return build_model(resolved), streams


def train(
    preset: Any = None,
    overrides: Sequence[str] = (),
    config: Optional[TrainConfig] = None,
    data: Optional[Iterator[AudioBatch]] = None,
    eval_data: Optional[Sequence[AudioBatch]] = None,
) -> dict[str, Any]:
    """Compose ``preset`` and train it; without ``data``, on ``config.data`` (auto: the built-in corpus or tones).

    With ``config.out_dir`` the run directory is locked for the run and must not hold another run
    unless ``config.resume`` (continue from its last good checkpoint: model, optimizer, step, RNG)
    or ``config.overwrite``. Returns a summary: steps, final loss, eval metrics before and after,
    checkpoint path, time. Ctrl-C raises :class:`TrainingInterrupted` naming the last good checkpoint.
    """
    cfg = config or TrainConfig()
    cfg.check()
    run = open_run_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite) if cfg.out_dir else None
    try:
        synthetic = data is None
        model, streams = _build(preset, overrides, run, cfg, synthetic)
        if streams is not None:
            data, eval_data = streams
        if run is not None:
            run.start(spec=model.spec, config={k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite")})
        with torch.random.fork_rng(devices=[]):  # the run's RNG use never leaks into the caller's
            torch.manual_seed(cfg.seed)
            return _run(model, cfg, run, data, eval_data, synthetic)
    finally:
        if run is not None:
            run.close()


def _latest_or(root: Path, fallback: Optional[Path]) -> Optional[Path]:
    try:
        return read_latest(root) or fallback
    except AudioMoEError:
        return fallback


def _run(model: Any, cfg: TrainConfig, run: Optional[RunDir], data: Any, eval_data: Any, synthetic: bool) -> dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, ckpt = 0, None
    if run is not None and run.resume_from is not None:
        state = load_trainer_state(run.resume_from, opt)
        start, ckpt = state["step"], run.resume_from
        if start >= cfg.steps:
            raise AudioMoEError(f"'{run.path}' is already at step {start}; ask for more --steps (total) to continue it")
        for group in opt.param_groups:  # the options given now win over those the state was saved with
            group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
        torch.set_rng_state(state["rng"]["torch"])
        saved = (state.get("extra") or {}).get("data")
        if saved is not None and callable(getattr(data, "load_state_dict", None)):
            data.load_state_dict(saved)  # a loader stream resumes from its saved position: no replay
        elif synthetic:  # replay the seeded stream to where the run stopped: same batches as an unbroken run
            for _ in range(start):
                next(data)
    bar = Progress(cfg.steps, start, "auto" if cfg.progress else "off", cfg.log_every)
    if ckpt is not None:
        bar.note(f"resuming {run.path} from {ckpt.name} (step {start})")
    before = evaluate(model, eval_data) if eval_data else {}
    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    loss_value = float("nan")
    fed: set[str] = set()
    step = start
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = next(data)
            # training never generates: costly heads (predicts_cheaply=False) skip predict()
            out = model(batch, predict=False)
            if out.loss is None:
                raise AudioMoEError("training batches must carry targets")
            fed.update(out.indices)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            model.advance_schedules()  # aux-weight / noise schedules: once per optimizer step, never per forward

            loss_value = float(out.loss.detach())
            if not math.isfinite(loss_value):
                last = f"; the last good checkpoint is {ckpt}" if ckpt else ""
                raise AudioMoEError(f"loss became {loss_value} at step {step}; lower the learning rate (lr={cfg.lr}){last}")
            bar.step(step, loss_value)
            at_eval = bool(eval_data) and (step % cfg.eval_every == 0 or step == cfg.steps)
            if at_eval:
                history.append({"step": step, "loss": loss_value, **evaluate(model, eval_data)})
            if run is not None and (at_eval or (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps):
                extra = {"data": data.state_dict()} if callable(getattr(data, "state_dict", None)) else None
                ckpt = save_checkpoint(model, run.path, step, opt, cfg.keep, extra=extra)
    except KeyboardInterrupt:
        bar.close()
        if run is not None:  # the interrupt may land inside a save, after `latest` moved on
            ckpt = _latest_or(run.path, ckpt)
        raise TrainingInterrupted(step, ckpt) from None
    finally:
        bar.close()
    unfed = [n for n in model.task_names if n not in fed]
    if unfed:  # the caller's data never named these heads: say so rather than report them as trained
        warnings.warn(
            f"the training data never had an item for head(s) {unfed}: they did not train; "
            "give batches for every task or drop those heads (tasks.NAME=null)", RuntimeWarning, stacklevel=3
        )
    result = {
        "untrained_heads": unfed,
        "steps": cfg.steps,
        "start_step": start,
        "final_loss": loss_value,
        "eval_before": before,
        "eval_after": history[-1] if history else {},
        "checkpoint": str(ckpt) if ckpt else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "config": {f.name: getattr(cfg, f.name) for f in fields(cfg)},
    }
    if callable(getattr(data, "summary", None)):  # a loader stream: items, hours, bad items skipped
        result["data"] = data.summary()
    if run is not None:
        tmp = run.path / f".summary.json.{os.getpid()}"
        tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
        os.replace(tmp, run.path / "summary.json")
    return result
