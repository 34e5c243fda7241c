"""The frozen-encoder feature cache (encoders/cache.py) in the MoWE mixture: exact, invalidated, bounded."""

from __future__ import annotations

import torch

from audiomoe.encoders.cache import FeatureCache
from audiomoe.testing import build_component

SR = 16000


def _mixture(cache_mb: float = 64.0):
    spec = {
        "base": {"name": "whisper", "params": {"window": "trim", "config": {"max_source_positions": 50}}},
        "weak": [{"name": "whisper", "params": {"window": "trim"}}, {"name": "hubert"}],
        "fusion": {"name": "concat", "params": {"router_input": "pooled", "router": {"name": "dense"}}},
        "feature_cache_mb": cache_mb,
    }
    return build_component("encoder", "mowe_mixture", spec, {"d_model": 16, "task_names": ["a"]})


def _frozen(mix):
    for enc in [mix.base, *mix.weak]:
        enc.requires_grad_(False)
    return mix


def _calls(mix) -> list[int]:
    calls = [0] * (1 + len(mix.weak))
    for k, enc in enumerate([mix.base, *mix.weak]):
        enc.register_forward_hook(lambda *_a, k=k: calls.__setitem__(k, calls[k] + 1))
    return calls


def _clips(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(SR // 2, SR, (n,), generator=g)
    x = torch.randn(n, int(lengths.max()), generator=g) * 0.1
    x = x * (torch.arange(x.shape[1])[None] < lengths[:, None])
    return x, lengths


def _valid(out) -> torch.Tensor:
    return out.features[~out.padding_mask]


def test_cached_features_equal_a_fresh_computation_and_epoch_two_runs_no_encoder():
    torch.manual_seed(0)
    mix = _frozen(_mixture()).train()
    fresh = _frozen(_mixture(cache_mb=0.0)).train()
    fresh.load_state_dict(mix.state_dict())
    calls = _calls(mix)
    batches = [_clips(2, s) for s in range(2)]
    first = [mix(x, n) for x, n in batches]
    assert calls == [4, 4, 4] and mix.feature_cache.misses == 2 * 2 * 3  # each missed clip encoded alone
    second = [mix(x, n) for x, n in reversed(batches)][::-1]  # epoch 2, another order
    assert calls == [4, 4, 4], "a frozen encoder ran again on clips it had encoded"
    assert mix.feature_cache.hits == 2 * 2 * 3
    for (x, n), a, b in zip(batches, first, second):
        torch.testing.assert_close(_valid(b), _valid(a), rtol=0, atol=0)
        for i in range(x.shape[0]):  # the cache holds what the uncached mixture computes for the clip alone
            one = mix(x[i : i + 1, : int(n[i])], n[i : i + 1])
            ref = fresh(x[i : i + 1, : int(n[i])], n[i : i + 1])
            torch.testing.assert_close(_valid(one), _valid(ref), rtol=1e-5, atol=1e-6)
            assert _valid(ref).abs().mean() > 1e-3  # real features, not zeros


def test_a_clips_cached_features_do_not_depend_on_the_batch_it_came_in():
    """Whisper trimmed to the batch's longest clip lets padding reach valid frames: the cache encodes clips alone."""
    torch.manual_seed(2)
    a, b = _frozen(_mixture()).eval(), _frozen(_mixture()).eval()
    b.load_state_dict(a.state_dict())
    x, n = _clips(2, 11)
    short = int(torch.argmin(n))
    a(x, n)  # the short clip first seen beside a longer one (padded)
    alone = x[short : short + 1, : int(n[short])]
    b(alone, n[short : short + 1])  # ... and alone

    def by_clip(mix):  # (slot, digest, length, rate) -> features; the weights' version differs between two models
        return {(k[0], *k[2:]): v for k, v in mix.feature_cache._items.items() if k[-2] == int(n[short])}

    fa, fb = by_clip(a), by_clip(b)
    assert len(fa) == 3 and fa.keys() == fb.keys()  # base + two weak encoders
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=0)


def test_a_changed_weight_invalidates_and_a_trainable_encoder_bypasses_the_cache():
    torch.manual_seed(1)
    mix = _frozen(_mixture()).eval()
    calls = _calls(mix)
    x, n = _clips(2, 7)
    before = mix(x, n)
    with torch.no_grad():
        mix.weak[1].model.feature_projection.projection.weight.mul_(3.0)  # in place: the weights' version moves
    after = mix(x, n)
    assert calls == [2, 2, 4], "new weak weights must be encoded again (clip by clip), the others served"
    assert (_valid(after) - _valid(before)).abs().max() > 1e-4
    mix.weak[0].requires_grad_(True)  # trainable again: its features can change at every step
    mix(x, n)
    mix(x, n)
    assert calls == [2, 4, 4]  # the trainable one ran twice (batched), the others were served


def test_the_cache_is_bounded_in_bytes_least_recently_used_first():
    cache = FeatureCache(max_bytes=3 * 10 * 4 * 4)  # three clips of 10 frames x 4 float32
    enc = torch.nn.Linear(4, 4).requires_grad_(False)

    def run(wav, lengths):
        from audiomoe.core.interfaces import EncoderOutput

        feats = enc(wav[..., None].expand(-1, -1, 4)[:, :10])
        return EncoderOutput(feats, torch.zeros(feats.shape[:2], dtype=torch.bool))

    clips = [torch.randn(1, 10) for _ in range(5)]
    for c in clips:
        cache.encode("e", enc, c, torch.tensor([10]), SR, run)
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    cache.encode("e", enc, clips[-1], torch.tensor([10]), SR, run)
    assert cache.hits == 1  # the newest stayed; the oldest went
    cache.encode("e", enc, clips[0], torch.tensor([10]), SR, run)
    assert cache.misses == 6
