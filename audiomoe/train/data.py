"""Training data for a run and for each stage: the built-in corpus, a manifest, a data spec, or tones.

``recipe.data`` is ``auto`` (the built-in corpus when every head is one of its tasks, else tones),
``builtin``, ``tones``, a manifest path, or a data spec mapping (the data layer's format). A
stage's ``data:`` narrows or reweights it (:class:`~audiomoe.train.recipe.StageData`): ``tasks``
keeps items of those tasks, ``weights`` draws tasks in fixed proportions (one source per task),
``balanced: N`` is a fixed balanced subset of N items per task (UniMoE-Audio stage 2),
``temperature`` is temperature sampling over tasks, ``spec`` replaces the data.

Processes: each rank reads its own disjoint shard (the sampler's ``rank::world_size`` split; for
tones, rank r takes its slice of the seeded global batch). ``batch_size`` is global.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from typing import Any, Callable, Optional, Sequence

import torch

from audiomoe.core.batch import AudioBatch
from audiomoe.core.errors import AudioMoEError
from audiomoe.data.synthetic import classification_tasks, tone_batch, tone_stream
from audiomoe.train.recipe import StageData

log = logging.getLogger("audiomoe.train")


def _head_kind(model: Any, name: str) -> str:
    info = getattr(model.heads[name], "audiomoe_component", None)
    kind = info.name if info is not None else type(model.heads[name]).__name__
    return kind + (", multi-label" if getattr(getattr(model.heads[name], "params", None), "multi_label", False) else "")


def resolve_choice(model: Any, data: Any) -> Any:
    """``auto`` -> ``builtin`` (every head is a corpus task) or ``tones``; a mapping / other string is checked and returned."""
    from audiomoe.data.corpus.make import CORPUS_TASKS

    if isinstance(data, dict):
        return data
    if data == "auto":
        return "builtin" if set(model.task_names) <= set(CORPUS_TASKS) else "tones"
    if data not in ("builtin", "tones") and not os.path.isfile(data):
        raise AudioMoEError(
            f"--data {data!r} is not 'auto', 'builtin', 'tones', an existing manifest (.jsonl) or a data YAML"
        )
    if str(data).endswith((".yaml", ".yml")):  # a data spec: its relative source paths are the YAML's folder's
        from audiomoe.core.safe_yaml import load_yaml_file

        raw = load_yaml_file(data, "data config")
        raw = raw["data"] if isinstance(raw, dict) and set(raw) == {"data"} else raw
        if not isinstance(raw, dict):
            raise AudioMoEError(f"--data {data!r}: a data YAML holds a mapping with 'sources:' (see docs/data.md)")
        for src in (raw.get("sources") or {}).values():
            if isinstance(src, dict) and isinstance(src.get("path"), str):
                src["path"] = os.path.join(os.path.dirname(os.path.abspath(data)), os.path.expanduser(src["path"]))
        return raw
    return data


class LoaderStream:
    """Endless batches of a loader that can report its :meth:`summary` and save / restore its position."""

    def __init__(self, loader: Any) -> None:
        self.loader, self._it = loader, None

    def __iter__(self) -> "LoaderStream":
        return self

    def __next__(self) -> AudioBatch:
        if self._it is None:  # created lazily: a restored position must come first
            self._it = self.loader.stream()
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


class ToneStream:
    """The seeded tone stream, this rank's slice of each global batch; its position is the batch count."""

    def __init__(
        self, tasks: dict[str, int], batch_size: int, sr: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.args, self.rank, self.world, self.local = (tasks, batch_size, sr, seed), rank, world, batch_size // world
        self.count, self._it = 0, tone_stream(tasks, batch_size, sr, seed=seed)

    def __iter__(self) -> "ToneStream":
        return self

    def __next__(self) -> AudioBatch:
        b = next(self._it)
        self.count += 1
        if self.world == 1:
            return b
        sl = slice(self.rank * self.local, (self.rank + 1) * self.local)
        return AudioBatch(b.waveforms[sl], b.sample_rate, list(b.tasks)[sl], b.lengths[sl], list(b.targets)[sl])

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": 0, "batch": n}``: batches drawn so far (same shape as a loader's state)."""
        return {"epoch": 0, "batch": self.count, "seed": self.args[3]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Replay the seeded stream to ``state['batch']`` (the tones are cheap to regenerate)."""
        self.count, self._it = 0, tone_stream(*self.args[:3], seed=self.args[3])
        for _ in range(int(state["batch"])):
            next(self._it)
        self.count = int(state["batch"])


def _tones(
    model: Any, tasks: Sequence[str], batch_size: int, seed: int, rank: int, world: int, eval_batches: int
) -> tuple[Any, list[AudioBatch]]:
    classes = classification_tasks(model, tasks)
    unfed = [n for n in tasks if n not in classes]
    if unfed:
        heads = ", ".join(f"'{n}' ({_head_kind(model, n)})" for n in unfed)
        drop = " ".join(f"--set tasks.{n}=null" for n in unfed)
        raise AudioMoEError(
            f"the built-in synthetic data feeds only single-label classification heads; head(s) {heads} "
            f"would never train. Train this model on your own batches (audiomoe.train.train(..., data=...)), "
            f"or drop those heads ({drop})"
        )
    sr = int(model.encoder.sample_rate)
    g = torch.Generator().manual_seed(seed + 10_000)
    eval_data = [tone_batch(classes, batch_size, sr, generator=g) for _ in range(eval_batches)]
    return ToneStream(classes, batch_size, sr, seed, rank, world), eval_data


def corpus_paths(model: Any, manifest: str, tasks: Sequence[str]) -> dict[str, str]:
    """The manifest each task reads in the built-in corpus: the corpus itself, or (codec-code tasks) its codes.

    Codes are those of the head's ``codec`` (``codes-<codec>-<key>/``, :func:`audiomoe.data.codes.codec_codes`),
    else of ``mel_rvq`` fitted for the head's layout (``codes-k<K>-v<V>/``); each made once beside the corpus.
    """
    from audiomoe.data.codes import codec_codes, corpus_codes
    from audiomoe.data.corpus.make import CODE_TASKS
    from audiomoe.train.codec_audio import head_codec

    out: dict[str, str] = {}
    made: dict[int, str] = {}  # one codes folder per head (one codec head may serve tts and text_to_music)
    for t in tasks:
        if t not in CODE_TASKS:
            out[t] = manifest
            continue
        head = model.heads[t]
        p = getattr(head, "params", None)
        k, size = getattr(p, "num_codebooks", None), getattr(p, "codebook_size", None)
        sizes = set(size) if isinstance(size, list) else {size}
        if k is None or None in sizes:
            raise AudioMoEError(
                f"corpus task '{t}' has codec-code targets, but head '{t}' ({_head_kind(model, t)}) takes none; "
                "give it a codec head (codec or codec_generation) or drop it"
            )
        if id(head) in made:
            out[t] = made[id(head)]
            continue
        codec = head_codec(head, t)
        if codec is not None:
            out[t] = made[id(head)] = str(codec_codes(manifest, codec, tasks=CODE_TASKS))
            continue
        if len(sizes) != 1:
            raise AudioMoEError(
                f"head '{t}' has codebooks of sizes {sorted(sizes)}; the corpus's codec (mel_rvq) writes one size for all"
            )
        out[t] = made[id(head)] = str(corpus_codes(manifest, int(k), int(sizes.pop()), tasks=CODE_TASKS))
    return out


def manifest_sources(paths: dict[str, str], split: str) -> dict[str, Any]:
    """Data-spec sources reading ``paths`` (task -> manifest): one source per manifest (``data``, ``data1``, ...)."""
    by_path: dict[str, list[str]] = {}
    for t, p in paths.items():
        by_path.setdefault(p, []).append(t)
    return {
        ("data" if i == 0 else f"data{i}"): {"path": p, "split": split, "only_tasks": ts}
        for i, (p, ts) in enumerate(by_path.items())
    }


def _manifest_spec(
    paths: dict[str, str], split: str, sd: Optional[StageData], local: int, seed: int, sr: int, workers: int
) -> dict[str, Any]:
    """A data spec over the manifests ``paths`` (task -> manifest), shaped by a stage's subset / weights / balance."""
    sampling: dict[str, Any] = {}
    tasks = list(paths)
    sources = manifest_sources(paths, split)
    if sd is not None and sd.weights is not None:
        sources = {
            t: {"path": paths[t], "split": split, "only_tasks": [t], "weight": float(sd.weights.get(t, 1.0))}
            for t in tasks
        }
        sampling = {
            "mode": "weights",
            "group_by": "source",
            **({"epoch_items": sd.epoch_items} if sd.epoch_items else {}),
        }
    elif sd is not None and sd.balanced is not None:
        sampling = {"mode": "balanced", "group_by": "task", "per_group": sd.balanced}
    elif sd is not None and sd.temperature is not None:
        sampling = {"mode": "temperature", "group_by": "task", "alpha": sd.temperature}
    return {
        "sources": sources,
        "max_seconds": 3.0 * local,
        "max_items": local,
        "max_clip_seconds": 5.0,
        "num_workers": workers,
        "seed": seed,
        "sample_rate": sr,
        **({"sampling": sampling} if sampling else {}),
    }


def _narrow(spec: dict[str, Any], tasks: list[str], sd: Optional[StageData], local: int, seed: int) -> dict[str, Any]:
    """A user's data spec restricted to ``tasks``, with a stage's balance / temperature applied."""
    spec = copy.deepcopy(spec)
    for src in spec.get("sources", {}).values():
        if isinstance(src, dict) and src.get("type", "manifest") == "manifest":
            src["only_tasks"] = [t for t in (src.get("only_tasks") or tasks) if t in tasks]
    spec.setdefault("max_items", local)
    spec.setdefault("seed", seed)
    if sd is not None and sd.weights is not None:
        raise AudioMoEError(
            "stage data 'weights' needs the recipe's data as a manifest path or 'builtin'; "
            "with a data spec, give the stage a whole 'spec' with source weights"
        )
    if sd is not None and (sd.balanced is not None or sd.temperature is not None):
        mode = (
            {"mode": "balanced", "per_group": sd.balanced}
            if sd.balanced is not None
            else {"mode": "temperature", "alpha": sd.temperature}
        )
        spec["sampling"] = {**spec.get("sampling", {}), "group_by": "task", **mode}
    return spec


def build_data(
    model: Any,
    data: Any,
    stage: Optional[StageData],
    *,
    batch_size: int,
    seed: int,
    eval_batches: int,
    rank: int = 0,
    world: int = 1,
    progress: bool = False,
    workers: int = 1,
    eval_tasks: Optional[Sequence[str]] = None,
) -> tuple[Any, list[AudioBatch]]:
    """``(endless train stream for this rank, eval batches)`` for ``model`` from the recipe's ``data`` and a stage's."""
    from audiomoe.data import build_loader, builtin_corpus
    from audiomoe.train.layout import check_batch

    check_batch(batch_size, world)  # also what `train --nproc` checks before it starts the ranks
    local = batch_size // world
    tasks = list(model.task_names)
    if stage is not None and stage.tasks is not None:
        bad = [t for t in stage.tasks if t not in tasks]
        if bad:
            raise AudioMoEError(f"stage data names task(s) {bad} but the model has heads only for {tasks}")
        tasks = [t for t in tasks if t in stage.tasks]
    choice = resolve_choice(model, data)
    if stage is not None and stage.spec is not None:
        choice = stage.spec
    evaluate_on = [t for t in (eval_tasks or tasks)]
    if choice == "tones":
        if stage is not None and (stage.weights or stage.balanced or stage.temperature):
            raise AudioMoEError("stage data weights / balanced / temperature need corpus or manifest data, not tones")
        return _tones(model, tasks, batch_size, seed, rank, world, eval_batches)
    sr = int(model.encoder.sample_rate)
    clip_level = [t for t in model.task_names if getattr(model.heads[t], "clip_level", False)]  # may be cropped
    if isinstance(choice, dict):
        train_spec = {"crop_tasks": clip_level, **_narrow(choice, tasks, stage, local, seed)}
        eval_spec = {"crop_tasks": clip_level, **_narrow(choice, evaluate_on, None, local, seed)}
        eval_spec["num_workers"] = 0
    else:

        def caches() -> tuple[str, dict[str, str]]:  # made once: rank 0 first, the others then read them
            p = str(builtin_corpus(progress=progress) if choice == "builtin" else choice)
            return p, (corpus_paths(model, p, list(dict.fromkeys(tasks + evaluate_on))) if choice == "builtin" else {})

        path, paths = rank_zero_first(rank, world, caches)
        paths = {t: paths.get(t, path) for t in dict.fromkeys(tasks + evaluate_on)}
        train_spec = {
            **_manifest_spec({t: paths[t] for t in tasks}, "train", stage, local, seed, sr, workers),
            "crop_tasks": clip_level,
        }
        evaluate_on = _held_out(paths, evaluate_on) if eval_batches else []
        eval_spec = _manifest_spec({t: paths[t] for t in evaluate_on}, "test", None, local, seed, sr, 0)
        eval_spec["crop_tasks"] = clip_level  # held-out transcripts are scored whole, as eval scores them
    train_loader = build_loader(train_spec, rank=rank, world_size=world)
    fed = {it.task for it in train_loader.dataset.items}
    unfed = [t for t in tasks if t not in fed]
    if unfed:  # never train a model on a subset of its heads: the others would stay random, silently
        where = "the data spec" if isinstance(choice, dict) else f"'{choice}'"
        raise AudioMoEError(
            f"no training items for head(s) {', '.join(unfed)} in {where} (training split; it has: {', '.join(sorted(fed)) or 'none'}); "
            f"add items of those tasks, or drop the heads with {' '.join(f'--set tasks.{t}=null' for t in unfed)}"
        )
    eval_loader = build_loader(eval_spec) if eval_batches and evaluate_on else None
    check_targets(model, train_loader.dataset.items + (eval_loader.dataset.items if eval_loader else []))
    eval_data = list(itertools.islice(iter(eval_loader), eval_batches)) if eval_loader else []
    return LoaderStream(train_loader), eval_data


def check_targets(model: Any, items: Sequence[Any], limit: int = 5) -> None:
    """Every item's target through its head's ``make_targets`` before training: a bad one is named by file and line now,
    not when it is first sampled (codec targets, files read by the loader, are checked there)."""
    bad: list[str] = []
    for it in items:
        head = model.heads[it.task] if it.task in model.heads else None
        if head is None or (isinstance(it.target, dict) and ("codes" in it.target or "audio" in it.target)):
            continue
        try:
            head.make_targets([it.target], torch.device("cpu"))
        except AudioMoEError as exc:
            bad.append(f"{it.origin}: {exc}")
            if len(bad) == limit:
                break
    if bad:
        more = " (first {limit}; there may be more)".format(limit=limit) if len(bad) == limit else ""
        raise AudioMoEError(f"{len(bad)} item(s) with a target their head cannot use{more}: " + "; ".join(bad))


def rank_zero_first(rank: int, world: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, then (after a barrier) on the other ranks of an initialised process group.

    For caches: rank 0 makes the corpus or its codec codes, the others find them made. Rank 0
    reaches the barrier even when ``fn`` fails, so no rank waits forever (theirs then fails alike).
    """
    group = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if not group:
        return fn()
    if rank == 0:
        try:
            return fn()
        finally:
            torch.distributed.barrier()
    torch.distributed.barrier()
    return fn()


def _held_out(paths: dict[str, str], tasks: Sequence[str]) -> list[str]:
    """The tasks with test-split items in their manifest; the others are named once on the log (not evaluated)."""
    from audiomoe.data.manifest import read_manifest

    found: dict[str, set[str]] = {}
    for p in set(paths[t] for t in tasks):
        try:
            items, _ = read_manifest(p, split="test", check_files=False)
        except AudioMoEError:  # no test split at all
            items = []
        found[p] = {it.task for it in items}
    missing = [t for t in tasks if t not in found[paths[t]]]
    if missing:
        log.warning(
            "no held-out ('test' split) items for task(s) %s: they are trained but not evaluated", ", ".join(missing)
        )
    return [t for t in tasks if t not in missing]


def stage_tasks(model: Any, stage: Optional[StageData]) -> list[str]:
    """The model's tasks a stage's data feeds (all of them without a ``tasks`` filter)."""
    return [t for t in model.task_names if stage is None or stage.tasks is None or t in stage.tasks]
