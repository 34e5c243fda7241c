"""Whisper / HuBERT / WavLM / wav2vec2 encoders: parity with transformers, windows, layers, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

from audiomoe.core.errors import AudioMoEError
from audiomoe.encoders.features import normalize_waveforms, prepare_waveforms, whisper_log_mel
from audiomoe.encoders.hf_common import MissingPretrainedError
from audiomoe.encoders.hubert import Hubert
from audiomoe.encoders.ssl_base import TINY_SSL
from audiomoe.encoders.wav2vec2 import Wav2Vec2
from audiomoe.encoders.wavlm import WavLM
from audiomoe.encoders.whisper import TINY_WHISPER, Whisper

SR = 16000
SMALL_WIN = {"max_source_positions": 50}  # a 1 s window keeps pad30 tests fast


def _audio(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, generator=g) * 0.1


def _whisper(**params) -> Whisper:
    params.setdefault("config", SMALL_WIN)
    return Whisper(Whisper.Params(**params)).eval()


# -- features ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    fe = T.WhisperFeatureExtractor(feature_size=n_mels)
    x = _audio(2, SR * 3).numpy()
    x[1, SR:] = 0.0  # a clip with trailing silence
    ref = fe(list(x), sampling_rate=SR, return_tensors="pt").input_features
    ours = whisper_log_mel(torch.nn.functional.pad(torch.from_numpy(x), (0, 30 * SR - x.shape[1])), n_mels)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_waveform_normalisation_matches_wav2vec2_feature_extractor():
    fe = T.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    x = _audio(2, 4000)
    lengths = torch.tensor([4000, 1500])
    ref = fe([x[0].numpy(), x[1, :1500].numpy()], sampling_rate=SR, padding=True, return_tensors="pt").input_values
    torch.testing.assert_close(
        normalize_waveforms(x * (torch.arange(4000) < lengths[:, None]), lengths), ref, atol=1e-5, rtol=0
    )


# -- Whisper ---------------------------------------------------------------------------------------


def test_whisper_pad30_parity_with_transformers_30s_window():
    enc = Whisper(Whisper.Params()).eval()  # the real 30 s window (1500 positions), tiny width
    x = _audio(2, SR * 2)
    lengths = torch.tensor([SR * 2, SR])
    fe = T.WhisperFeatureExtractor()
    mel = fe([x[0].numpy(), x[1, :SR].numpy()], sampling_rate=SR, return_tensors="pt").input_features
    with torch.no_grad():
        ref = enc.model(mel).last_hidden_state
        out = enc(x, lengths)
    assert out.features.shape == (2, 100, 32)
    assert (~out.padding_mask).sum(1).tolist() == [100, 50]
    torch.testing.assert_close(out.features[0], ref[0, :100], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features[1, :50], ref[1, :50], atol=1e-5, rtol=0)
    assert out.features[1, 50:].abs().sum() == 0


@pytest.mark.parametrize("prefix_model", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_whisper_pretrained_roundtrip_parity(tmp_path, prefix_model):
    cfg = T.WhisperConfig(**{**TINY_WHISPER, **SMALL_WIN})
    torch.manual_seed(3)
    hf = getattr(T, prefix_model)(cfg).eval()
    hf.save_pretrained(tmp_path)
    enc = Whisper(Whisper.Params(pretrained=str(tmp_path))).eval()
    hf_enc = hf.get_encoder() if prefix_model == "WhisperModel" else hf.model.encoder
    fe = T.WhisperFeatureExtractor(chunk_length=1)
    x = _audio(2, SR)
    mel = fe(list(x.numpy()), sampling_rate=SR, return_tensors="pt").input_features
    with torch.no_grad():
        ref = hf_enc(mel, output_hidden_states=True)
        out = enc(x)
        torch.testing.assert_close(out.features, ref.last_hidden_state, atol=1e-5, rtol=0)
        mid = Whisper(Whisper.Params(pretrained=str(tmp_path), layer=1)).eval()(x)
        torch.testing.assert_close(mid.features, ref.hidden_states[1], atol=1e-5, rtol=0)


def test_whisper_trim_is_batch_invariant_and_cheaper_shape():
    enc = _whisper(window="trim", config={})
    x = _audio(3, 9000)
    lengths = torch.tensor([9000, 3000, 1])
    with torch.no_grad():
        out = enc(x, lengths)
        assert out.features.shape[1] == 29  # ceil(9000 / 320), not 1500
        for i in range(3):
            alone = enc(x[i : i + 1, : lengths[i]]).features[0]
            torch.testing.assert_close(out.features[i, : alone.shape[0]], alone, atol=1e-5, rtol=0)


def test_whisper_long_audio_is_chunked_not_truncated():
    enc = _whisper()  # 1 s window
    x = _audio(2, int(2.5 * SR))
    lengths = torch.tensor([int(2.5 * SR), SR // 2])
    with torch.no_grad():
        out = enc(x, lengths)
        assert (~out.padding_mask).sum(1).tolist() == [125, 25]
        # chunk 2 (seconds 1..2) equals encoding that second alone
        second = enc(x[:1, SR : 2 * SR]).features[0]
        torch.testing.assert_close(out.features[0, 50:100], second, atol=1e-5, rtol=0)
        last = enc(x[:1, 2 * SR :]).features[0]
        torch.testing.assert_close(out.features[0, 100:125], last, atol=1e-5, rtol=0)


def test_whisper_weighted_layers_learn_and_freeze_stops_backbone_grads():
    enc = _whisper(layer="weighted", freeze=True)
    enc.train()
    assert not enc.model.training  # a frozen backbone stays in eval mode
    out = enc(_audio(2, 4000))
    out.features.pow(2).mean().backward()
    assert enc.select.weights.grad is not None and enc.select.weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.model.parameters())


def test_whisper_bad_layer_index_is_refused():
    with pytest.raises(AudioMoEError, match="layer=7 is out of range"):
        _whisper(layer=7)


# -- HuBERT / WavLM / wav2vec2 ---------------------------------------------------------------------


def test_hubert_parity_with_transformers_and_exact_frames():
    enc = Hubert(Hubert.Params()).eval()
    x = _audio(3, SR)
    lengths = torch.tensor([SR, 8000, 0])
    with torch.no_grad():
        out = enc(x, lengths)
        ref = enc.model(x * (torch.arange(SR) < lengths[:, None])).last_hidden_state
    n = enc.model._get_feat_extract_output_lengths(lengths).clamp_min(0)
    assert (~out.padding_mask).sum(1).tolist() == n.tolist() == [49, 24, 0]
    torch.testing.assert_close(out.features[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features[1, :24], ref[1, :24], atol=1e-5, rtol=0)
    assert out.features[2].abs().sum() == 0


def test_hubert_emotion_checkpoint_roundtrip_parity(tmp_path):
    """A fine-tuned HubertForSequenceClassification saved locally loads through ``pretrained:``."""
    torch.manual_seed(5)
    cfg = T.HubertConfig(**TINY_SSL, num_labels=4, feat_extract_norm="layer", do_stable_layer_norm=True)
    hf = T.HubertForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path)
    T.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(tmp_path)
    enc = Hubert(Hubert.Params(pretrained=str(tmp_path), layer="weighted")).eval()
    assert enc.normalize and enc.use_attention_mask
    x = _audio(2, 6400)
    lengths = torch.tensor([6400, 3200])
    fe = T.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path)
    inputs = fe([x[0].numpy(), x[1, :3200].numpy()], sampling_rate=SR, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf.hubert(inputs.input_values, attention_mask=inputs.attention_mask, output_hidden_states=True)
        out = enc(x, lengths)
    want = torch.stack(ref.hidden_states).mean(0)  # zero-initialised weights = uniform mix
    torch.testing.assert_close(out.features[0], want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features[1, :9], want[1, :9], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [WavLM, Wav2Vec2])
def test_wavlm_and_wav2vec2_match_their_transformers_models(cls, tmp_path):
    enc = cls(cls.Params()).eval()
    enc.model.save_pretrained(tmp_path)
    again = cls(cls.Params(pretrained=str(tmp_path))).eval()
    x = _audio(2, 4800)
    with torch.no_grad():
        torch.testing.assert_close(again(x).features, enc.model(x).last_hidden_state, atol=1e-5, rtol=0)


def test_missing_pretrained_names_the_id_and_the_fix(tmp_path):
    with pytest.raises(MissingPretrainedError, match="'nobody/no-such-model' are missing.*huggingface-cli download"):
        Hubert(Hubert.Params(pretrained="nobody/no-such-model"))
    with pytest.raises(MissingPretrainedError, match="has no config.json"):
        Whisper(Whisper.Params(pretrained=str(tmp_path)))


def test_wrong_checkpoint_family_is_refused(tmp_path):
    T.WhisperModel(T.WhisperConfig(**TINY_WHISPER)).save_pretrained(tmp_path)
    with pytest.raises(AudioMoEError, match="is a 'whisper' model, not 'hubert'"):
        Hubert(Hubert.Params(pretrained=str(tmp_path)))


# -- bad input -------------------------------------------------------------------------------------

ENCODERS = [lambda: _whisper(), lambda: _whisper(window="trim"), lambda: Hubert(Hubert.Params()).eval()]


@pytest.mark.parametrize("make", ENCODERS, ids=["whisper-pad30", "whisper-trim", "hubert"])
def test_bad_input_is_refused_clearly(make):
    enc = make()
    with pytest.raises(AudioMoEError, match="empty waveform"):
        enc(torch.zeros(2, 0))
    x = _audio(3, 4000)
    x[1, 10] = float("nan")
    x[2, 20] = float("inf")
    with pytest.raises(AudioMoEError, match=r"NaN or inf samples in item\(s\) \[1, 2\]"):
        enc(x)
    x = _audio(2, 4000)
    x[1, 3000] = float("nan")  # in the padding: ignored
    assert torch.isfinite(enc(x, torch.tensor([4000, 2000])).features).all()


@pytest.mark.parametrize("make", ENCODERS, ids=["whisper-pad30", "whisper-trim", "hubert"])
def test_int16_stereo_and_ragged_batches_are_handled(make):
    enc = make()
    x = _audio(2, 8000)
    with torch.no_grad():
        ref = enc(x).features
        pcm = (x * 32768).round().clamp(-32768, 32767).to(torch.int16)
        torch.testing.assert_close(enc(pcm.numpy()).features, ref, atol=2e-3, rtol=0)
        stereo = torch.stack([x, x], 1)  # [B, C, T]: down-mixed by averaging channels
        torch.testing.assert_close(enc(stereo).features, ref, atol=1e-6, rtol=0)
        # a zero-length item and very different lengths in one batch
        y = _audio(3, 3 * SR)
        out = enc(y, torch.tensor([3 * SR, 500, 0]))
    assert torch.isfinite(out.features).all()
    n_valid = (~out.padding_mask).sum(1)
    assert n_valid[2] == 0 and out.features[2].abs().sum() == 0
    assert n_valid[0] > n_valid[1] > 0


def test_prepare_waveforms_checks():
    x, n = prepare_waveforms(np.zeros(100, dtype=np.int16))
    assert x.shape == (1, 100) and x.dtype == torch.float32 and n.tolist() == [100]
    with pytest.raises(AudioMoEError, match="lengths has 1 entries for 2 waveforms"):
        prepare_waveforms(torch.zeros(2, 10), torch.tensor([3]))
    with pytest.raises(AudioMoEError, match="must be real audio"):
        prepare_waveforms(torch.zeros(2, 10, dtype=torch.complex64))
    with pytest.raises(AudioMoEError, match=r"got shape \(1, 1, 2, 3\)"):
        prepare_waveforms(torch.zeros(1, 1, 2, 3))


def test_model_resamples_other_rates_to_the_encoder_rate():
    import audiomoe

    model = audiomoe.compose(
        {
            "d_model": 16,
            "encoder": {"name": "hubert"},
            "tasks": {"cls": {"name": "classification", "params": {"num_classes": 2}}},
        }
    ).eval()
    x = _audio(1, 44100)  # one second at 44.1 kHz
    with torch.no_grad():
        h, pad, _, _ = model.encode(x, None, 44100)
    assert (~pad).sum() == 49  # one second at 16 kHz -> 49 HuBERT frames
