"""A stage's ``weak_specialists``: pretrained weak encoders for MoWE-Audio (Zhang et al., ICASSP 2025, 2409.06635).

MoWE-Audio's premise is a pool of *pretrained* weak encoders that each know something the base
does not (Whisper-tiny, HuBERT-base, a HuBERT fine-tuned for emotion). With no weights to
download, a recipe makes such a pool on its own data: before the stage's first step, each listed
weak encoder ``E_k`` of the model's mixture (``model.encoder.weak[k]``) is trained alone as a
specialist on its own tasks, with a temporary linear head per task on its mean-pooled features:

    logits_t = W_t mean_{valid frames} E_k(a) + b_t        L_k = sum_t share_t * loss_t(logits_t, y)

(the model's own head of task ``t`` gives the loss and the targets; AdamW, linear warmup + cosine,
clipping at 1). The heads are then dropped, ``E_k``'s weights stay in the composed model, and
(``freeze: true``, the default) ``encoder.weak.k`` is frozen for this stage and every later one,
resumed ones included, whatever their ``train`` lists say. Recipe form::

    stages:
      - name: train
        steps: 300
        freeze: [encoder.base]
        weak_specialists: {steps: 400, encoders: {0: [speaker, style], 1: [event], 2: [language]}}

The report (the stage's entry of the run summary) gives each encoder's probe accuracy on the whole
held-out split of its tasks, with a 95% Wilson interval and chance. Every rank trains the same
encoders on the same (unsharded) data with the same seed; a sharded (FSDP / EP) model is refused.
A resumed stage does not pretrain again: its checkpoint holds the pretrained weights.

The key ``base`` pretrains the *base* encoder the same way (the mixture's ``encoder.base``, or a
plain encoder ``encoder`` for the base-only comparison): MoWE-Audio's base is a pretrained, frozen
Whisper, so a study whose base is random-init gives every arm the same pretrained base (at one seed
a plain Whisper and the mixture's base start from the same weights and share one cached
pretraining), and only the routers, projections, adapter and heads train afterwards::

        weak_specialists: {steps: 200, encoders: {base: [language, speaker, style, event], 0: [speaker, style]}}

Runs that differ only after the pretraining (a study's MoWE variants at one seed: another router,
another fusion) would pretrain the same encoders again; with ``reuse`` (the default) the result is
stored in the cache directory under a digest of everything it depends on (the encoder's initial
weights, its tasks, these settings, the seed, the data choice, the corpus version and this package's
source) and loaded by the next run that asks for the same: any difference in those gives another digest.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from audiomoe.core.errors import AudioMoEError

if TYPE_CHECKING:  # torch is imported by the functions: the recipe module (and `audiomoe list`) stays torch-free
    import torch

    from audiomoe.train.run_state import RunContext


class WeakSpecialistsSpec(BaseModel):
    """Which weak encoders of the mixture pretrain on which tasks, for how long (module doc)."""

    model_config = ConfigDict(extra="forbid")

    encoders: dict[Union[int, Literal["base"]], list[str]] = Field(
        min_length=1, description="weak encoder index (or 'base': the base encoder) -> the tasks it is pretrained on"
    )
    steps: int = Field(200, ge=1, le=10**6, description="optimizer steps per weak encoder")
    lr: float = Field(3e-3, gt=0.0, le=10.0, description="peak learning rate (AdamW, warmup then cosine to 10%)")
    warmup: int = Field(10, ge=0, le=10**6, description="linear warmup steps")
    batch_size: Optional[int] = Field(None, ge=1, le=4096, description="items per step (None: the recipe's batch_size)")
    freeze: bool = Field(True, description="keep the pretrained weak encoders frozen in this and every later stage")
    reuse: bool = Field(
        True,
        description="reuse a pretraining of the same initial weights, tasks, settings, seed and data "
        "from the cache directory ($AUDIOMOE_CACHE/weak-specialists)",
    )

    @field_validator("encoders")
    @classmethod
    def _tasks(cls, v: dict[Union[int, str], list[str]]) -> dict[Union[int, str], list[str]]:
        bad = [k for k, tasks in v.items() if (k != "base" and int(k) < 0) or not tasks]
        if bad:
            raise ValueError(f"weak encoder(s) {bad}: give 'base' or an index >= 0, and at least one task each")
        return dict(sorted(v.items(), key=lambda kv: (kv[0] != "base", str(kv[0]))))  # the base first


def _is_mixture(model: Any) -> bool:
    return getattr(getattr(model, "encoder", None), "weak", None) is not None


def encoder_of(model: Any, key: Union[int, str]) -> Any:
    """The encoder a ``weak_specialists`` key names: ``weak[k]``, or for ``base`` the mixture's base / the plain encoder."""
    if key == "base":
        return model.encoder.base if _is_mixture(model) else model.encoder
    return model.encoder.weak[int(key)]


def param_prefix(model: Any, key: Union[int, str]) -> str:
    """The parameter-name prefix of that encoder in ``model`` (what ``freeze`` drops from training)."""
    if key == "base":
        return "encoder.base." if _is_mixture(model) else "encoder."
    return f"encoder.weak.{key}."


def _mixture(model: Any, spec: WeakSpecialistsSpec, where: str) -> Any:
    enc = getattr(model, "encoder", None)
    weak = getattr(enc, "weak", None)
    if weak is None and any(k != "base" for k in spec.encoders):
        raise AudioMoEError(
            f"{where}.weak_specialists: the model's encoder ({type(enc).__name__}) has no weak pool; "
            "use a mowe_mixture encoder, pretrain only 'base', or remove weak_specialists"
        )
    for k, tasks in spec.encoders.items():
        if k != "base" and int(k) >= len(weak):
            raise AudioMoEError(
                f"{where}.weak_specialists.encoders: index {k} but the mixture has {len(weak)} weak encoders "
                f"(0..{len(weak) - 1})"
            )
        unknown = [t for t in tasks if t not in model.task_names]
        if unknown:
            raise AudioMoEError(
                f"{where}.weak_specialists.encoders.{k}: task(s) {unknown} are not heads of the model "
                f"({model.task_names})"
            )
        missing = [t for t in tasks if not isinstance(getattr(model.heads[t].params, "num_classes", None), int)]
        if missing:
            raise AudioMoEError(
                f"{where}.weak_specialists.encoders.{k}: task(s) {missing} have no num_classes; "
                "weak specialists pretrain on classification tasks"
            )
    return enc


def _pooled(enc: Any, wav: "torch.Tensor", lengths: "torch.Tensor", sr: int) -> "torch.Tensor":
    """Mean of the weak encoder's valid frames [B, D] (audio resampled to its rate, as the mixture does)."""
    from audiomoe.encoders.features import resample

    if int(enc.sample_rate) != sr:
        wav, lengths = resample(wav, lengths, sr, int(enc.sample_rate))
    out = enc(wav, lengths)
    valid = (~out.padding_mask).to(out.features.dtype)[..., None]
    return (out.features * valid).sum(1) / valid.sum(1).clamp_min(1.0)


def _batch_loss(
    model: Any, enc: Any, probes: Any, batch: Any, device: "torch.device"
) -> tuple["torch.Tensor", dict[str, list[int]]]:
    """The specialist's loss on one batch and, per task, its items' correct (1) / wrong (0) predictions."""
    import torch

    wav = batch.waveforms.to(device)
    lengths = batch.lengths if batch.lengths is not None else torch.full((wav.shape[0],), wav.shape[1])
    pooled = _pooled(enc, wav, lengths.to(device), int(batch.sample_rate))
    tasks, loss, hits = batch.task_list(), pooled.new_zeros(()), {}
    for t in dict.fromkeys(tasks):
        idx = [i for i, x in enumerate(tasks) if x == t]
        head = model.heads[t]
        logits = probes[t](pooled[torch.tensor(idx, device=device)])
        target = head.make_targets([batch.targets[i] for i in idx], device)
        loss = loss + head.loss(logits, target) * (len(idx) / len(tasks))
        if target.dim() == 1:
            hits[t] = (logits.argmax(-1) == target).long().tolist()
    return loss, hits


def pretrain_one(
    model: Any,
    k: Union[int, str],
    tasks: list[str],
    spec: WeakSpecialistsSpec,
    recipe: Any,
    *,
    seed: int,
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Train encoder ``k`` (a weak index or ``base``) alone on ``tasks`` (temporary heads), then score it held out."""
    import torch
    from torch import nn

    from audiomoe.train.data import build_data, resolve_choice
    from audiomoe.train.heldout import wilson_interval
    from audiomoe.train.recipe import StageData

    enc = encoder_of(model, k)
    device = next(model.parameters()).device
    width = int(enc.output_dim)
    probes = nn.ModuleDict({t: nn.Linear(width, int(model.heads[t].params.num_classes)) for t in tasks}).to(device)
    held_batches = 8 if resolve_choice(model, recipe.data) == "tones" else 1000  # the corpus: its whole held-out split
    data, held = build_data(
        model,
        recipe.data,
        StageData(tasks=tasks),
        batch_size=spec.batch_size or recipe.batch_size,
        seed=seed,
        eval_batches=held_batches,
        progress=progress,
        workers=workers,
    )
    flags = [p.requires_grad for p in enc.parameters()]
    params = [*enc.parameters(), *probes.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.01, foreach=False)
    t0, losses, was = time.perf_counter(), [], enc.training
    enc.train()
    try:
        for step in range(spec.steps):
            warm = (step + 1) / spec.warmup if step < spec.warmup else 1.0
            span = max(spec.steps - spec.warmup, 1)
            cos = 0.1 + 0.45 * (1 + math.cos(math.pi * max(step - spec.warmup, 0) / span))
            for g in opt.param_groups:
                g["lr"] = spec.lr * min(warm, cos)
            loss, _ = _batch_loss(model, enc, probes, next(data), device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        enc.eval()
        correct: dict[str, list[int]] = {t: [] for t in tasks}
        with torch.no_grad():
            for batch in held:
                for t, h in _batch_loss(model, enc, probes, batch, device)[1].items():
                    correct[t] += h
    finally:
        enc.train(was)
        for p, f in zip(enc.parameters(), flags):
            p.requires_grad_(f)
    heldout = {}
    for t, h in correct.items():
        if h:
            lo, hi = wilson_interval(sum(h), len(h))
            heldout[t] = {
                "accuracy": sum(h) / len(h),
                "interval": [lo, hi],
                "items": len(h),
                "chance": 1.0 / int(model.heads[t].params.num_classes),
            }
    head = sum(losses[:10]) / max(len(losses[:10]), 1)
    return {
        "encoder": k,
        "tasks": tasks,
        "steps": spec.steps,
        "loss_first10": head,
        "loss_last10": sum(losses[-10:]) / max(len(losses[-10:]), 1),
        "heldout": heldout,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _reuse_key(enc: Any, tasks: list[str], spec: WeakSpecialistsSpec, recipe: Any) -> str:
    """A digest of everything a weak encoder's pretraining depends on (module doc)."""
    import hashlib
    import json

    import torch

    from audiomoe.data.corpus.make import VERSION
    from audiomoe.train import foundation_cache

    h = hashlib.blake2b(digest_size=20)
    for name, t in sorted(enc.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(
        json.dumps(
            {
                "tasks": tasks,
                "spec": spec.model_dump(mode="json", exclude={"encoders", "freeze", "reuse"}),
                "seed": recipe.seed,
                "batch": recipe.batch_size,
                "data": recipe.data,
                "corpus": VERSION,
                "code": foundation_cache.source_digest(),  # other pretraining code: another pretraining
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    return h.hexdigest()


def _reuse_dir() -> Any:
    from audiomoe.data.corpus.make import default_cache_dir

    return default_cache_dir() / "weak-specialists"


def _load_reused(enc: Any, key: str) -> Optional[dict[str, Any]]:
    import json

    from safetensors.torch import load_file

    path = _reuse_dir() / key
    try:
        report = json.loads((path / "report.json").read_text(encoding="utf-8"))
        enc.load_state_dict(load_file(str(path / "encoder.safetensors")))
    except (OSError, ValueError, RuntimeError):
        return None  # none stored (or damaged): pretrain
    return {**report, "reused": str(path)}


def _store_reused(enc: Any, key: str, report: dict[str, Any]) -> None:
    import json

    from safetensors.torch import save_file

    from audiomoe.data.atomic import build_once

    def write(tmp: Any) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items()}, f"{tmp}/encoder.safetensors")
        with open(f"{tmp}/report.json", "w", encoding="utf-8") as fh:
            json.dump(report, fh)

    # a whole directory renamed into place: a reader sees all of it or nothing; a concurrent store of the same wins
    build_once(_reuse_dir() / key, "report.json", write)


def pretrain_weak(
    model: Any,
    spec: WeakSpecialistsSpec,
    recipe: Any,
    where: str,
    *,
    note: Optional[Callable[[str], None]] = None,
    workers: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Pretrain every listed weak encoder of ``model``'s mixture in place (seeded by the recipe; caller's RNG kept)."""
    import torch

    _mixture(model, spec, where)
    out = []
    with torch.random.fork_rng(devices=[]):
        for k, tasks in spec.encoders.items():
            seed = recipe.seed * 1009 + (997 if k == "base" else int(k))
            torch.manual_seed(seed)
            what = "the base encoder" if k == "base" else f"weak encoder {k}"
            if note is not None:
                note(f"{where}: pretraining {what} on {', '.join(tasks)} ({spec.steps} steps)")
            enc = encoder_of(model, k)
            key = _reuse_key(enc, list(tasks), spec, recipe) if spec.reuse else None
            rep = _load_reused(enc, key) if key else None
            if rep is None:
                rep = pretrain_one(model, k, list(tasks), spec, recipe, seed=seed, workers=workers, progress=progress)
                if key:
                    _store_reused(enc, key, rep)
            if note is not None:
                accs = ", ".join(
                    f"{t} {v['accuracy']:.3f} (chance {v['chance']:.3f}, n={v['items']})"
                    for t, v in rep["heldout"].items()
                )
                note(f"{where}: {what} held-out probe accuracy: {accs}")
            out.append(rep)
    return out


def weak_stage(ctx: RunContext, idx: int, fresh: bool) -> dict[str, Any]:
    """The step loop's hook (before stage ``idx`` picks its trainable tensors): pretrain this stage's weak specialists
    when it starts fresh, and drop every weak encoder pretrained by this or an earlier stage (``freeze``) from what trains."""
    recipe, where = ctx.recipe, f"stages.{idx}"
    st = recipe.stages[idx]
    out: dict[str, Any] = {}
    spec = getattr(st, "weak_specialists", None)
    if spec is not None and fresh:
        if ctx.layout.sharded:
            raise AudioMoEError(
                f"{where}.weak_specialists: pretrain the weak encoders in a one-process stage, before sharding (FSDP / EP)"
            )
        out["weak_specialists"] = pretrain_weak(
            ctx.model, spec, recipe, where, note=ctx.bar.note, workers=ctx.opts.workers
        )
    for earlier in recipe.stages[: idx + 1]:
        ws = getattr(earlier, "weak_specialists", None)
        if ws is not None and ws.freeze:
            prefixes = tuple(param_prefix(ctx.model, k) for k in ws.encoders)
            ctx.built.difference_update({n for n in ctx.built if n.startswith(prefixes)})
    return out
