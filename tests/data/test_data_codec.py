"""The ``codec`` kind and the built-in ``mel_rvq``: registered, fitted by k-means, residual stages help, decodable."""

from __future__ import annotations

import math

import pytest
import torch

import audiomoe
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Codec


def clips(n=6, seconds=1.0, sr=16000):
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * sr)) / sr
    out = []
    for i in range(n):
        f = 200 * 1.5 ** (i % 4)
        out.append(
            0.3 * torch.sin(2 * math.pi * f * t) * (1 + 0.5 * torch.sin(2 * math.pi * 3 * t))
            + 0.02 * torch.randn(len(t), generator=g)
        )
    return out


def make(**params):
    params = {"codebook_size": 16, "num_codebooks": 3, "kmeans_iters": 5, "griffin_lim_iters": 4, **params}
    return audiomoe.component_builder("codec", {"name": "mel_rvq", "params": params})()


def test_registered_as_a_codec_component():
    names = [e.name for e in audiomoe.list_components("codec")]
    assert "mel_rvq" in names
    assert isinstance(make(), Codec)


def test_fit_encode_decode_and_residual_stages():
    codec = make().fit(clips())
    x = torch.stack(clips(2))
    codes, frames = codec.encode(x, torch.tensor([16000, 8000]))
    assert codes.shape == (2, 3, 16000 // 256 + 1) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert frames.tolist() == [63, 32]
    target = codec.frames(x)
    errs = [float((codec.dequantize(codes[:, :q]) - target).pow(2).mean()) for q in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2] and errs[0] < 0.9  # fitted: below the unit variance of the normalised frames
    assert errs[2] < 0.85 * errs[0]
    wav = codec.decode(codes)
    assert wav.shape == (2, (codes.shape[-1] - 1) * 256) and torch.isfinite(wav).all() and wav.abs().max() > 0
    for n in (
        0,
        1,
        2,
        4,
        5,
    ):  # a few generated frames (fewer than n_fft / hop + 1) still decode, to (n - 1) * hop samples
        short = codec.decode(codes[:, :, :n])
        assert (
            short.shape == (2, max(n - 1, 0) * 256) and torch.isfinite(short).all() and (n < 2 or short.abs().max() > 0)
        )


def test_fit_is_seeded_and_state_round_trips():
    a, b = make().fit(clips()), make().fit(clips())
    assert torch.equal(a.codebooks, b.codebooks) and bool(a.fitted)
    assert not torch.equal(make(seed=1).fit(clips()).codebooks, a.codebooks)
    c = make()
    c.load_state_dict(a.state_dict())
    x = torch.stack(clips(1))
    assert torch.equal(c.encode(x)[0], a.encode(x)[0])


def test_too_little_audio_is_a_named_error():
    with pytest.raises(AudioMoEError, match="at least codebook_size=16 frames"):
        make(fit_frames=16).fit([torch.zeros(256 * 4)])


def test_generation_pairs_get_codec_targets_the_codec_head_takes(tmp_path):
    import numpy as np
    import soundfile as sf

    from audiomoe.data import build_loader, encode_manifest, make_corpus, read_manifest

    manifest = make_corpus(tmp_path, "tiny", seed=0, workers=1, progress=False)
    pairs, _ = read_manifest(manifest, only_tasks=["tts", "text_to_music"])
    assert pairs and {p.task for p in pairs} == {"tts", "text_to_music"}
    for p in pairs:  # the input is another clip of the same voice / instrument; the target is the clip to write
        assert p.target["audio"] != p.audio and p.meta["reference"] in p.audio
    gen = encode_manifest(manifest, params={"codebook_size": 16, "num_codebooks": 4, "kmeans_iters": 3}, fit_clips=8)
    assert (tmp_path / "codec" / "mel_rvq.safetensors").exists()
    coded, _ = read_manifest(gen)
    assert [c.audio for c in coded] == [p.audio for p in pairs]
    for c, p in zip(coded, pairs):  # codes of the target clip, not of the input
        frames = np.load(c.target["codes"]).shape[1]
        assert abs(frames - sf.info(p.target["audio"]).duration * 16000 / 256) <= 2  # 62.5 frames/s at 16 kHz
    loader = build_loader({"sources": {"g": {"path": str(gen)}}, "num_workers": 1, "max_seconds": 30})
    batch = next(iter(loader))
    assert set(batch.tasks) <= {"tts", "text_to_music"} and all(isinstance(p, str) for p in batch.prompts)
    for codes in batch.targets:
        assert codes.dtype == torch.long and codes.shape[0] == 4 and int(codes.max()) < 16
    head = audiomoe.component_builder(
        "task", {"name": "codec_generation", "params": {"num_codebooks": 4, "codebook_size": 16, "max_frames": 400}}
    )(d_model=16)
    head.make_targets(list(batch.targets), torch.device("cpu"))
