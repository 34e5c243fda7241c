"""Sampling across groups (sources, tasks, datasets) and length-bucketed dynamic batches, resumable.

Each epoch is a pure function of ``(seed, epoch)``:

1. group shares: natural (every item once), fixed weights, temperature ``p_g ~ w_g * n_g**alpha``
   (the multilingual-BERT / XLM-R recipe) or a balanced subset of N items per group (UniMoE-Audio
   stage 2). Shares become exact per-group counts (largest remainder), so the realised
   proportions match the configured ones to within one item; items are drawn from each group by
   cycling seeded permutations (no item repeats before its group is exhausted);
2. the epoch order is shuffled, then split across ranks (``order[rank::world_size]``: disjoint
   shards that together cover the epoch);
3. windows of the shard are sorted by duration and cut into batches whose padded length
   (``items x longest``) stays under ``max_seconds`` (lhotse's DynamicBucketingSampler idea,
   simplified); the batch order inside a window is shuffled.

:meth:`BucketBatchSampler.state_dict` is ``{epoch, batch}``: a resumed sampler rebuilds the epoch
and skips the batches already consumed, so it yields exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

from audiomoe.core.errors import AudioMoEError


def group_shares(sizes: Sequence[int], weights: Sequence[float], mode: str, alpha: float = 0.5) -> np.ndarray:
    """Probability of each group: ``weights`` (mode weights), ``w * n**alpha`` (temperature) or ``n``."""
    n = np.asarray(sizes, dtype=float)
    w = np.asarray(weights, dtype=float)
    if mode == "weights":
        p = w * (n > 0)
    elif mode == "temperature":
        p = w * n**alpha * (n > 0)
    else:
        p = n
    if p.sum() <= 0:
        raise AudioMoEError("no items to sample from (every group is empty)")
    return p / p.sum()


def exact_counts(p: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``p * total`` (largest remainder)."""
    raw = p * total
    counts = np.floor(raw).astype(int)
    rest = total - counts.sum()
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts


class BucketBatchSampler:
    """Yields lists of ``(item_index, aug_seed)``: dynamic, length-bucketed, seeded, sharded, resumable.

    ``durations`` are item lengths in seconds; ``groups`` the group id of each item (for the sampling
    shares); ``weights`` one weight per group id.
    """

    def __init__(
        self,
        durations: Sequence[float],
        groups: Sequence[int],
        weights: Sequence[float],
        *,
        max_seconds: float,
        mode: str = "natural",
        alpha: float = 0.5,
        per_group: int = 100,
        epoch_items: Optional[int] = None,
        max_items: Optional[int] = None,
        bucket_batches: int = 50,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise AudioMoEError(f"rank {rank} is not in [0, world_size={world_size})")
        self.durations = np.asarray(durations, dtype=float)
        self.groups = np.asarray(groups, dtype=int)
        self.weights = list(weights)
        self.max_seconds, self.max_items = float(max_seconds), max_items
        self.mode, self.alpha, self.per_group, self.epoch_items = mode, alpha, per_group, epoch_items
        self.bucket_batches, self.seed, self.rank, self.world_size = bucket_batches, seed, rank, world_size
        self.epoch, self.start_batch = 0, 0
        self.members = [np.flatnonzero(self.groups == g) for g in range(len(self.weights))]
        self._subset = self._balanced_subset() if mode == "balanced" else None

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    def _balanced_subset(self) -> np.ndarray:
        rng = self._rng(7)  # fixed over epochs: the subset is chosen once
        picks = [rng.permutation(m)[: self.per_group] for m in self.members if len(m)]
        return np.sort(np.concatenate(picks))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The item indices of ``epoch`` for all ranks, in order (before sharding and bucketing)."""
        rng = self._rng(epoch, 1)
        if self.mode == "natural":
            return rng.permutation(len(self.durations))
        if self.mode == "balanced":
            return rng.permutation(self._subset)
        sizes = [len(m) for m in self.members]
        counts = exact_counts(
            group_shares(sizes, self.weights, self.mode, self.alpha), self.epoch_items or len(self.durations)
        )
        drawn = []
        for g, (m, c) in enumerate(zip(self.members, counts)):
            if c == 0:
                continue
            reps = -(-c // len(m))  # cycle permutations: no repeat before the group is used up
            drawn.append(np.concatenate([self._rng(epoch, 2, g, r).permutation(m) for r in range(reps)])[:c])
        return rng.permutation(np.concatenate(drawn))

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of ``epoch``: ``[(item_index, aug_seed), ...]`` each."""
        order = self.epoch_order(epoch)
        positions = np.arange(len(order))[self.rank :: self.world_size]
        shard = order[positions]
        rng = self._rng(epoch, 3, self.rank)
        # Typical window: bucket_batches batches of the mean clip length.
        per_batch = max(1, int(self.max_seconds / max(float(self.durations.mean()), 1e-6)))
        window = self.bucket_batches * per_batch
        batches: list[list[tuple[int, int]]] = []
        for start in range(0, len(shard), window):
            batches += self._window(shard, positions, np.arange(start, min(start + window, len(shard))), rng)
        return batches

    def _window(
        self, shard: np.ndarray, positions: np.ndarray, sl: np.ndarray, rng: np.random.Generator
    ) -> list[list[tuple[int, int]]]:
        # Sort by duration inside the window; the augmentation seed is the epoch position, so an
        # item drawn twice in an epoch gets two different augmentations, identically on resume.
        local = self._batches_of(shard[sl], rng)
        return [[(int(shard[sl[j]]), int(positions[sl[j]])) for j in b] for b in local]

    def _batches_of(self, idx: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        # Positions within idx, not item ids: weighted modes may draw an item twice.
        d = self.durations[idx]
        out: list[list[int]] = []
        cur: list[int] = []
        longest = 0.0
        for j in np.argsort(d, kind="stable"):
            full = self.max_items is not None and len(cur) >= self.max_items
            if cur and (max(longest, d[j]) * (len(cur) + 1) > self.max_seconds or full):
                out.append(cur)
                cur, longest = [], 0.0
            cur.append(int(j))
            longest = max(longest, float(d[j]))
        if cur:
            out.append(cur)
        return [out[k] for k in rng.permutation(len(out))]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.start_batch
        batches = self.epoch_batches(epoch)
        for b in batches[start:]:
            yield [(i, _mix(self.seed, epoch, s)) for i, s in b]
        self.start_batch = 0

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch)) - self.start_batch

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at ``epoch`` (from its first batch)."""
        self.epoch, self.start_batch = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        """Where the next iteration starts: ``{epoch, batch}`` (plus the seed, checked on load)."""
        return {"epoch": self.epoch, "batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state`` (from :meth:`state_dict` or the loader's consumed-batch count)."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise AudioMoEError(f"sampler state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.epoch, self.start_batch = int(state["epoch"]), int(state["batch"])


def _mix(seed: int, epoch: int, position: int) -> int:
    """A 32-bit augmentation seed for the item at ``position`` of ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])
