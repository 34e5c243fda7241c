"""The loader: a torch ``DataLoader`` over items that decodes, resamples and augments in workers.

``build_loader(config)`` validates a ``data:`` config (:mod:`audiomoe.data.spec`), reads every
source, and returns an :class:`AudioLoader`: an iterable of :class:`~audiomoe.model.AudioBatch`
(right-padded waveforms + lengths, tasks, targets, prompts) with dynamic, length-bucketed batches
from :class:`~audiomoe.data.sampling.BucketBatchSampler`. ``state_dict()`` counts the batches the
*consumer* received (not what workers prefetched), so a checkpointed run resumes on exactly the
next batch. Decoding uses soundfile (a cropped clip reads only its window); resampling the kit's one
bounded resampler (:func:`audiomoe.core.resample.resample_audio`: any rate, a kernel of a few MB).
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from audiomoe.core.batch import AudioBatch
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.resample import resample_audio
from audiomoe.data.augment import augment
from audiomoe.data.manifest import Item
from audiomoe.data.sampling import BucketBatchSampler


class _Bad:
    """A skipped item: its problem travels to the main process to be counted."""

    def __init__(self, message: str) -> None:
        self.message = message


class ItemDataset(torch.utils.data.Dataset):
    """Map-style dataset over items; ``ds[(index, seed)]`` -> ``(float32 mono tensor, item)``."""

    def __init__(
        self,
        items: Sequence[Item],
        sample_rate: int,
        *,
        max_clip_seconds: Optional[float] = None,
        augment: Any = None,
        skip_bad: bool = False,
        crop_tasks: Optional[Sequence[str]] = None,
    ) -> None:
        self.items, self.sample_rate = list(items), int(sample_rate)
        self.max_clip_seconds, self.augment, self.skip_bad = max_clip_seconds, augment, skip_bad
        self.crop_tasks = None if crop_tasks is None else set(crop_tasks)  # None: every task's clips may be cropped

    def __len__(self) -> int:
        return len(self.items)

    def croppable(self, it: Item) -> bool:
        """Whether a clip of ``it`` longer than ``max_clip_seconds`` is cropped (its task is one of ``crop_tasks``)."""
        return self.crop_tasks is None or it.task in self.crop_tasks

    def _decode(self, it: Item, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Read ``it``'s clip as float32 mono; a croppable long clip reads only its random window from disk."""
        import soundfile as sf

        try:
            with sf.SoundFile(io.BytesIO(it.blob) if it.blob is not None else it.audio) as f:
                sr = f.samplerate
                start = min(int(round(it.offset * sr)), f.frames)
                count = int(round(it.duration * sr)) if it.duration else -1  # -1: to the end
                have = f.frames - start if count < 0 else min(f.frames - start, count)
                if self.max_clip_seconds is not None and self.croppable(it) and have > self.max_clip_seconds * sr:
                    count = int(self.max_clip_seconds * sr)
                    start += int(rng.integers(0, have - count + 1))
                f.seek(start)
                x = f.read(count, dtype="float32", always_2d=True)
        except Exception as exc:  # noqa: BLE001 - missing, truncated or unsupported files
            raise AudioMoEError(f"{it.origin}: cannot decode '{it.audio or 'embedded audio'}': {exc}") from None
        return (x[:, 0] if x.shape[1] == 1 else x.mean(axis=1)), sr

    def load(self, index: int, seed: int) -> torch.Tensor:
        """Decode (cropping while reading), check, resample and augment item ``index`` (errors name its origin)."""
        it = self.items[index]
        rng = np.random.default_rng(seed)
        x, sr = self._decode(it, rng)
        if x.size == 0:
            raise AudioMoEError(f"{it.origin}: zero-length clip '{it.audio}'")
        if not np.isfinite(x).all():
            raise AudioMoEError(f"{it.origin}: clip '{it.audio}' contains NaN or inf samples")
        wav = torch.from_numpy(np.ascontiguousarray(resample_audio(x, sr, self.sample_rate)))
        if self.augment is not None:
            wav = torch.from_numpy(augment(wav.numpy(), self.sample_rate, self.augment, int(rng.integers(1 << 31))))
        return wav

    @staticmethod
    def _codes(it: Item) -> torch.Tensor:
        try:
            return torch.from_numpy(np.load(it.target["codes"]).astype(np.int64))
        except Exception as exc:  # noqa: BLE001 - missing or unreadable .npy
            raise AudioMoEError(f"{it.origin}: cannot load codec codes '{it.target['codes']}': {exc}") from None

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        try:
            it = self.items[index]
            wav = self.load(index, seed)
            if isinstance(it.target, dict) and "codes" in it.target:
                it = Item(**{**it.__dict__, "target": self._codes(it)})
            elif isinstance(it.target, dict) and "audio" in it.target:
                raise AudioMoEError(
                    f"{it.origin}: target {{'audio': ...}} is a clip to write, not codes yet; make codes with "
                    "audiomoe.data.encode_manifest(manifest) (or train on 'builtin', which does it for the corpus)"
                )
            return wav, it
        except AudioMoEError as exc:
            if not self.skip_bad:
                raise
            return _Bad(str(exc))


def collate(samples: Sequence[Any], sample_rate: int) -> tuple[Optional[AudioBatch], list[str]]:
    """Pad waveforms into ``[B, T]`` with lengths; return ``(batch or None, skipped problems)``."""
    bad = [s.message for s in samples if isinstance(s, _Bad)]
    good = [s for s in samples if not isinstance(s, _Bad)]
    if not good:
        return None, bad
    lengths = torch.tensor([w.numel() for w, _ in good], dtype=torch.long)
    wav = torch.zeros(len(good), int(lengths.max()))
    for i, (w, _) in enumerate(good):
        wav[i, : w.numel()] = w
    items = [it for _, it in good]
    prompts = [it.prompt for it in items]
    return AudioBatch(
        wav,
        sample_rate,
        [it.task for it in items],
        lengths,
        [it.target for it in items],
        prompts if any(p is not None for p in prompts) else None,
    ), bad


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers are processes: one thread each avoids oversubscription


class AudioLoader:
    """Iterable of :class:`AudioBatch` (one epoch per ``iter``) with a resumable ``state_dict``."""

    def __init__(
        self, dataset: ItemDataset, sampler: BucketBatchSampler, num_workers: int = 0, warn_bad: bool = True
    ) -> None:
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers
        self.bad: list[str] = []
        self.warn_bad = warn_bad
        self._state = {"epoch": sampler.epoch, "batch": sampler.start_batch}

    def _dataloader(self) -> torch.utils.data.DataLoader:
        from functools import partial

        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=partial(collate, sample_rate=self.dataset.sample_rate),
            worker_init_fn=_worker_init if self.num_workers else None,
            prefetch_factor=4 if self.num_workers else None,
        )

    def __iter__(self) -> Iterator[AudioBatch]:
        self.sampler.load_state_dict({**self._state, "seed": self.sampler.seed})
        epoch, before = self._state["epoch"], len(self.bad)
        try:
            for batch, bad in self._dataloader():
                self._state["batch"] += 1
                self.bad += bad
                if batch is not None:
                    yield batch
        except (
            AudioMoEError
        ) as exc:  # from a worker: torch wraps it in its traceback; the item's own line is the message
            text = str(exc).strip()
            if "Original Traceback" not in text:
                raise
            raise AudioMoEError(text.splitlines()[-1].split("AudioMoEError: ", 1)[-1]) from None
        self._state = {"epoch": epoch + 1, "batch": 0}
        if self.warn_bad and len(self.bad) > before:
            warnings.warn(
                f"audiomoe data: skipped {len(self.bad) - before} bad item(s) in epoch {epoch} (skip_bad); first: {self.bad[before]}",
                RuntimeWarning,
                stacklevel=2,
            )

    def __len__(self) -> int:
        return len(self.sampler.epoch_batches(self._state["epoch"])) - self._state["batch"]

    def stream(self) -> Iterator[AudioBatch]:
        """Endless batches, epoch after epoch (what a step-based trainer reads)."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, int]:
        """``{epoch, batch, seed}``: the next batch this loader will yield (save it in checkpoints)."""
        return {**self._state, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``; the next batch is the one an uninterrupted run would see next."""
        self.sampler.load_state_dict(state)
        self._state = {"epoch": int(state["epoch"]), "batch": int(state["batch"])}

    def summary(self) -> dict[str, Any]:
        """Counts for a run's summary: items, total hours, bad items skipped so far."""
        hours = float(self.sampler.durations.sum()) / 3600
        return {
            "items": len(self.dataset),
            "hours": round(hours, 3),
            "bad_items": len(self.bad),
            "bad_examples": self.bad[:5],
        }


def _group_key(by: str, source: str, domain: Optional[str], it: Item) -> str:
    """The sampling group of an item: its source, task, dataset, or domain (source's, meta's, dataset)."""
    if by == "source":
        return source
    if by == "task":
        return it.task
    if by == "dataset":
        return it.dataset or source
    return domain or it.meta.get("domain") or it.dataset or source


def build_loader(
    config: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: Optional[int] = None,
    base_dir: Any = None,
    registry: Any = None,
) -> AudioLoader:
    """Validate a ``data:`` config (mapping or YAML path), read its sources, return an :class:`AudioLoader`."""
    from audiomoe.data.spec import load_data_spec

    spec, sources = load_data_spec(config, base_dir, registry)
    items: list[Item] = []
    groups: list[int] = []
    names: dict[str, int] = {}
    weights: list[float] = []
    bad: list[str] = []
    by = spec.sampling.group_by
    for sname, source in sources.items():
        sspec = spec.sources[sname]
        its, skipped = source.items(task=sspec.task, tasks=spec.tasks, skip_bad=spec.skip_bad)
        bad += skipped
        for it in its:
            key = _group_key(by, sname, sspec.domain, it)
            if key not in names:
                names[key] = len(names)
                weights.append(sspec.weight if by == "source" else 1.0)
            items.append(it)
            groups.append(names[key])
    if bad:
        warnings.warn(
            f"audiomoe data: skipped {len(bad)} bad item(s) while indexing (skip_bad); first: {bad[0]}",
            RuntimeWarning,
            stacklevel=2,
        )
    ds = ItemDataset(
        items,
        spec.sample_rate,
        max_clip_seconds=spec.max_clip_seconds,
        augment=spec.augment,
        skip_bad=spec.skip_bad,
        crop_tasks=spec.crop_tasks,
    )
    durations = [
        min(it.duration, spec.max_clip_seconds or math.inf) if ds.croppable(it) else it.duration for it in items
    ]
    s = spec.sampling
    sampler = BucketBatchSampler(
        durations,
        groups,
        weights,
        max_seconds=spec.max_seconds,
        mode=s.mode,
        alpha=s.alpha,
        per_group=s.per_group,
        epoch_items=s.epoch_items,
        max_items=spec.max_items,
        bucket_batches=spec.bucket_batches,
        seed=spec.seed,
        rank=rank,
        world_size=world_size,
    )
    loader = AudioLoader(ds, sampler, spec.num_workers if num_workers is None else num_workers)
    loader.bad += bad
    loader.group_names = list(names)
    return loader
