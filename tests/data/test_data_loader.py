"""The loader and samplers: proportions, resumption, rank shards, bucketing, resampling, augmentation.

The sampler tests use many synthetic durations (no audio); the loader tests real wav files and real
DataLoader worker processes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from audiomoe.data import BucketBatchSampler, build_loader
from audiomoe.data.sampling import exact_counts, group_shares


def sampler(n_per_group=(6000, 3000, 1000), **kw):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(len(n_per_group)), n_per_group)
    kw.setdefault("max_seconds", 30.0)
    return BucketBatchSampler(
        rng.uniform(0.5, 4.0, len(groups)), groups, kw.pop("weights", [1.0] * len(n_per_group)), **kw
    )


def drawn_groups(s, epoch=0):
    idx = [i for b in s.epoch_batches(epoch) for i, _ in b]
    return np.bincount(s.groups[idx], minlength=len(s.weights)) / len(idx), idx


@pytest.mark.parametrize(
    "mode, weights, expected",
    [
        ("weights", [1.0, 2.0, 1.0], [0.25, 0.5, 0.25]),
        ("temperature", [1.0, 1.0, 1.0], np.sqrt([6000, 3000, 1000]) / np.sqrt([6000, 3000, 1000]).sum()),
        ("natural", [1.0, 1.0, 1.0], [0.6, 0.3, 0.1]),
    ],
)
def test_sampler_proportions_within_2_percent_over_10k(mode, weights, expected):
    s = sampler(weights=weights, mode=mode, alpha=0.5, epoch_items=10_000)
    for epoch in (0, 1):
        p, idx = drawn_groups(s, epoch)
        assert len(idx) == 10_000
        np.testing.assert_allclose(p, expected, atol=0.02)
        np.testing.assert_allclose(p, expected, atol=1e-3)  # exact counts: within rounding
    # Items of a group do not repeat before the group is exhausted (group 2: 1000 items, ~1430 draws).
    _, idx = drawn_groups(s)
    g2 = [i for i in idx if s.groups[i] == 0]
    assert len(set(g2)) == min(len(g2), 6000)


def test_group_shares_and_exact_counts():
    np.testing.assert_allclose(group_shares([100, 1], [1, 1], "temperature", alpha=0.0), [0.5, 0.5])
    np.testing.assert_allclose(group_shares([100, 0], [1, 5], "weights"), [1.0, 0.0])
    assert exact_counts(np.array([1 / 3] * 3), 10).tolist() in ([4, 3, 3], [3, 4, 3], [3, 3, 4])


def test_balanced_subset_is_fixed_and_per_group():
    s = sampler(mode="balanced", per_group=50)
    p0, idx0 = drawn_groups(s, 0)
    _, idx1 = drawn_groups(s, 1)
    assert len(idx0) == 150 and np.allclose(p0, 1 / 3)
    assert sorted(idx0) == sorted(idx1) and idx0 != idx1  # same subset, new order


def test_two_ranks_disjoint_and_covering():
    shards = [sampler(n_per_group=(500, 300), rank=r, world_size=2) for r in range(2)]
    seen = [[i for b in s.epoch_batches(3) for i, _ in b] for s in shards]
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(800))
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_batches_respect_max_seconds_and_are_bucketed():
    s = sampler(max_seconds=20.0, max_items=8)
    batches = s.epoch_batches(0)
    for b in batches:
        d = s.durations[[i for i, _ in b]]
        assert len(b) <= 8 and (len(b) == 1 or d.max() * len(b) <= 20.0)
    spread = np.mean([np.ptp(s.durations[[i for i, _ in b]]) for b in batches])
    assert spread < 0.5  # random batches of U(0.5, 4) would spread ~2.5 s


def test_sampler_is_deterministic_and_resumes_mid_epoch():
    a, b = sampler(seed=5), sampler(seed=5)
    assert list(a) == list(b)
    assert list(sampler(seed=6))[:3] != list(a)[:3]
    full = list(a)
    b.load_state_dict({"epoch": 0, "batch": 7, "seed": 5})
    assert list(b) == full[7:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(48):
        sr = 22050 if i % 3 == 0 else 16000
        n = int(sr * rng.uniform(0.2, 1.2))
        sf.write(root / f"{i}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), sr, subtype="FLOAT")
        lines.append({"audio": f"{i}.wav", "task": "a" if i % 4 else "b", "target": i})
    (root / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def config(root, **kw):
    return {
        "sources": {"s": {"path": str(root / "m.jsonl")}},
        "max_seconds": 3.0,
        "seed": 1,
        "augment": {"p": 0.7, "snr_db": [5, 20], "gain_db": [-6, 6], "reverb": 0.3},
        **kw,
    }


def flat(batches):
    return [(tuple(b.targets), b.waveforms.shape, float(b.waveforms.double().sum())) for b in batches]


def test_loader_resumes_exactly_with_workers(corpus):
    ref = build_loader(config(corpus), num_workers=2)
    uninterrupted = flat(list(ref) + list(ref))  # two epochs
    first = build_loader(config(corpus), num_workers=2)
    it = iter(first.stream())
    head = [next(it) for _ in range(len(ref.sampler.epoch_batches(0)) + 3)]  # into epoch 1
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    del it
    resumed = build_loader(config(corpus), num_workers=1)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert state["epoch"] == 1 and state["batch"] == 3
    assert flat(head) + flat(tail) == uninterrupted


def test_loader_batches_pad_resample_and_augment(corpus):
    loader = build_loader(config(corpus, augment=None), num_workers=0)
    batches = list(loader)
    assert sum(len(b.tasks) for b in batches) == 48
    for b in batches:
        assert b.sample_rate == 16000 and b.lengths.max() == b.waveforms.shape[1]
        for w, n, t in zip(b.waveforms, b.lengths, b.targets):
            x, sr = sf.read(corpus / f"{t}.wav", dtype="float32")
            assert int(n) == -(-len(x) * 16000 // sr)  # resampled (torchaudio: ceil of the scaled length)
            assert torch.all(w[int(n) :] == 0)
            if sr == 16000:
                assert torch.allclose(w[: int(n)], torch.from_numpy(x))
    aug = flat(build_loader(config(corpus), num_workers=0))
    assert aug == flat(build_loader(config(corpus), num_workers=2))  # seeded per item, not per worker
    assert aug != flat(batches) and aug != flat(build_loader(config(corpus, seed=2), num_workers=0))


def test_rank_loaders_split_the_items(corpus):
    seen = [
        sorted(
            t
            for b in build_loader(config(corpus, augment=None), rank=r, world_size=2, num_workers=0)
            for t in b.targets
        )
        for r in (0, 1)
    ]
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(48))


def test_loader_groups_by_task_with_temperature(corpus):
    loader = build_loader(
        config(
            corpus, augment=None, sampling={"mode": "temperature", "alpha": 0.0, "group_by": "task", "epoch_items": 400}
        ),
        num_workers=0,
    )
    assert loader.group_names == ["a", "b"] or loader.group_names == ["b", "a"]
    tasks = [t for b in loader for t in b.tasks]
    assert len(tasks) == 400 and tasks.count("b") == 200  # alpha 0: uniform over tasks (12 vs 36 items)
