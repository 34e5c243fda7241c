"""The transformers codecs ``dac``, ``encodec``, ``mimi``: registered, codes equal to transformers' own pipeline
(feature extractor + ``encode``) on random tiny models, padding handled as each model's causality allows,
decode at the model's shape and rate, resampling at the boundary, local checkpoints, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import audiomoe
from audiomoe.core.errors import AudioMoEError, MissingPretrainedError

NAMES = ["dac", "encodec", "mimi"]


def make(name, **params):
    return audiomoe.component_builder("codec", {"name": name, "params": params})()


def clip(n, seed):
    return 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def batch(lengths, seed=0):
    """Right-padded [B, max(lengths)] of seeded noise, zeros past each length."""
    x = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        x[i, :n] = clip(n, seed + i)
    return x, torch.tensor(lengths)


@torch.no_grad()  # inference, as the codec runs: grad mode takes other CPU kernels (EnCodec's LSTM), and last-bit
# differences flip near-ties in the deep RVQ stages, where residuals are small
def reference_codes(codec, x, lengths):
    """What a transformers user gets: the model's feature extractor pads the clips, its ``encode`` codes them."""
    from transformers import DacFeatureExtractor, EncodecFeatureExtractor

    clips = [x[i, : int(n)].numpy() for i, n in enumerate(lengths)]
    m, sr = codec.model, codec.sample_rate
    if codec.model_type == "dac":
        fe = DacFeatureExtractor(sampling_rate=sr, hop_length=m.config.hop_length)
        inp = fe(clips, sampling_rate=sr, return_tensors="pt")
        return m.encode(inp["input_values"], n_quantizers=codec.num_codebooks).audio_codes
    fe = EncodecFeatureExtractor(feature_size=1, sampling_rate=sr)
    inp = fe(raw_audio=clips, sampling_rate=sr, return_tensors="pt")
    if codec.model_type == "encodec":
        return m.encode(inp["input_values"], inp["padding_mask"], bandwidth=codec.bandwidth).audio_codes[0]
    return m.encode(inp["input_values"], inp["padding_mask"], num_quantizers=codec.num_codebooks).audio_codes


def test_audiomoe_list_codec_shows_all_four(capsys):
    from audiomoe.cli import main

    assert main(["list", "codec"]) == 0
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines()[2:]]
    assert sorted(rows) == [["codec", n, "builtin"] for n in sorted(["mel_rvq", *NAMES])]


@pytest.mark.parametrize(
    "name,params,k",
    [
        ("dac", {}, 4),
        ("dac", {"num_quantizers": 2}, 2),
        ("encodec", {}, 3),  # the smallest bandwidth, 1.5 kbps: floor(1500 / (75 * 6)) = 3 codebooks of 64
        ("encodec", {"bandwidth": 6.0}, 13),
        ("mimi", {}, 4),
        ("mimi", {"num_quantizers": 2}, 2),
    ],
)
def test_codes_equal_the_transformers_pipeline_on_a_padded_batch(name, params, k):
    codec = make(name, **params)
    hop = codec.hop
    lengths = [9 * hop + 37, 4 * hop, 6 * hop - 5]
    x, n = batch(lengths)
    codes, frames = codec.encode(x, n)
    ref = reference_codes(codec, x, n)
    assert codes.dtype == torch.long and codes.shape == (3, k, 10) and ref.shape == codes.shape
    assert torch.equal(codes, ref)
    assert frames.tolist() == [10, 4, 6]  # ceil(length / hop)
    if name == "mimi":
        assert frames.tolist() == codec.model.get_encoded_length(n).tolist()
    assert codec.frame_rate == codec.sample_rate / hop and codec.num_codebooks == k
    assert 0 <= int(codes.min()) and int(codes.max()) < codec.codebook_size


@pytest.mark.parametrize("name", ["encodec", "mimi"])
def test_causal_codecs_padded_codes_equal_the_clip_alone(name):
    """Causal: a frame sees no later sample, so padding after a clip changes none of its frames.

    EnCodec's left padding mirrors the next 6 frames (reflect): it holds from 7 frames on, and a
    5-frame clip's first frames do see the padding; Mimi pads with zeros: it holds at any length.
    """
    codec = make(name)
    hop = codec.hop
    for n, exact in [(7 * hop, 7), (7 * hop + 11, 7), (12 * hop, 12)]:  # a partial last frame: all but it
        x, lengths = batch([n, 14 * hop])
        padded, frames = codec.encode(x, lengths)
        alone, _ = codec.encode(x[:1, :n])
        assert frames[0] == alone.shape[-1] == -(-n // hop)
        assert torch.equal(padded[0, :, :exact], alone[0, :, :exact])
        assert torch.equal(padded[1:], codec.encode(x[1:])[0])  # the longer item is unaffected by its neighbour
    x, lengths = batch([5 * hop, 14 * hop])
    short_equal = torch.equal(codec.encode(x, lengths)[0][0, :, :5], codec.encode(x[:1, : 5 * hop])[0][0])
    assert short_equal == (name == "mimi")


def test_dac_padding_changes_only_the_frames_within_its_lookahead():
    """DAC is not causal: frames whose span plus ``lookahead`` ends inside the clip equal the clip alone; items never mix."""
    codec = make("dac")
    g = torch.Generator().manual_seed(3)
    for mod in codec.model.modules():  # non-zero biases: the padding's activations are not zeros, as in real weights
        if isinstance(mod, torch.nn.Conv1d) and mod.bias is not None:
            mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g))
    hop, n = codec.hop, 20 * codec.hop
    x, lengths = batch([n, 30 * hop])
    padded, _ = codec.encode(x, lengths)
    alone, _ = codec.encode(x[:1, :n])
    safe = (n - codec.lookahead) // hop
    assert codec.lookahead == 3 + 320 + 39 * (1 + 2 + 8 + 40) + (1 * 1 + 2 * 2 + 2 * 8 + 4 * 40)
    assert 0 < safe < 20
    assert torch.equal(padded[0, :, :safe], alone[0, :, :safe])
    assert not torch.equal(padded[0, :, safe:20], alone[0, :, safe:20])  # the lookahead is real, not a loose bound
    zero_padded = torch.nn.functional.pad(x[:1, :n], (0, x.shape[1] - n))
    assert torch.equal(padded[:1], codec.encode(zero_padded)[0])


@pytest.mark.parametrize("name", NAMES)
def test_decode_has_the_models_shape_and_rate(name):
    codec = make(name)
    x, n = batch([7 * codec.hop, 3 * codec.hop])
    codes, _ = codec.encode(x, n)
    wav = codec.decode(codes)
    m = codec.model
    own = m.decode(audio_codes=codes).audio_values if name == "dac" else None
    if name == "encodec":
        own = m.decode(codes[None], [None]).audio_values[:, 0]
    if name == "mimi":
        own = m.decode(codes).audio_values[:, 0]
    assert wav.shape == own.shape and torch.allclose(wav, own)
    assert wav.shape[0] == 2 and abs(wav.shape[1] - 7 * codec.hop) < codec.hop and torch.isfinite(wav).all()
    assert codec.sample_rate == m.config.sampling_rate
    fewer = codec.decode(codes[:, :1])  # the first codebooks alone decode too (coarser)
    assert fewer.shape == wav.shape and not torch.allclose(fewer, wav)
    with pytest.raises(AudioMoEError, match=r"codes must lie in \[0, 64\)"):
        codec.decode(codes + 64)
    with pytest.raises(AudioMoEError, match="integer"):
        codec.decode(codes.float())


@pytest.mark.parametrize("name", ["dac", "encodec"])
def test_audio_at_another_rate_is_resampled_through_the_kits_resampler(name):
    from audiomoe.core.resample import resample_batch

    codec = make(name)
    other = 44100 if codec.sample_rate != 44100 else 16000
    x, n = batch([other // 4, other // 8])
    codes, frames = codec.encode(x, n, input_rate=other)
    y, m = resample_batch(x, n, other, codec.sample_rate)
    want, want_frames = codec.encode(y, m)
    assert torch.equal(codes, want) and torch.equal(frames, want_frames)
    assert frames[0] == -(-int(m[0]) // codec.hop) and int(m[0]) == codec.sample_rate // 4


def test_codec_stays_in_eval_mode_without_gradients():
    codec = make("dac")
    codec.train()
    assert not codec.model.training and not any(p.requires_grad for p in codec.parameters())
    x, n = batch([4000])
    assert torch.equal(codec.encode(x, n)[0], make("dac").encode(x, n)[0])  # seeded random weights


def test_a_local_checkpoint_loads_and_its_cache_key_follows_the_weights(tmp_path):
    import shutil

    from transformers import DacConfig, DacModel

    from audiomoe.codecs.dac import DAC

    torch.manual_seed(5)
    model = DacModel(DacConfig(**DAC.tiny_config)).eval()
    model.save_pretrained(tmp_path / "dac")
    codec = make("dac", pretrained=str(tmp_path / "dac"))
    x, n = batch([5000, 3000])
    with torch.no_grad():
        ref = model.encode(torch.nn.functional.pad(x, (0, 120))[:, None]).audio_codes
    assert torch.equal(codec.encode(x, n)[0], ref)
    assert codec.params.pretrained == str((tmp_path / "dac").resolve())
    shutil.copytree(tmp_path / "dac", tmp_path / "moved")
    assert make("dac", pretrained=str(tmp_path / "moved")).cache_key() == codec.cache_key()  # bytes, not path
    assert (
        make("dac").cache_key()
        != codec.cache_key()
        != make("dac", num_quantizers=2, pretrained=str(tmp_path / "dac")).cache_key()
    )


def test_clear_errors_for_missing_or_wrong_weights_and_bad_params(tmp_path):
    from transformers import EncodecConfig, EncodecModel

    from audiomoe.codecs.encodec import EnCodec

    with pytest.raises(MissingPretrainedError, match="never downloads"):
        make("dac", pretrained=str(tmp_path / "nowhere"))
    EncodecModel(EncodecConfig(**EnCodec.tiny_config)).save_pretrained(tmp_path / "enc")
    with pytest.raises(AudioMoEError, match="holds a 'encodec' model, not 'dac'"):
        make("dac", pretrained=str(tmp_path / "enc"))
    assert make("encodec", pretrained=str(tmp_path / "enc")).num_codebooks == 3
    with pytest.raises(AudioMoEError, match="not both"):
        make("dac", pretrained=str(tmp_path / "enc"), config={"n_codebooks": 2})
    with pytest.raises(AudioMoEError, match=r"bandwidth 2.0 is not one of .*\[1.5, 3.0, 6.0\]"):
        make("encodec", bandwidth=2.0)
    with pytest.raises(AudioMoEError, match="chunks with per-chunk loudness scales"):
        make("encodec", config={"chunk_length_s": 1.0, "overlap": 0.01, "normalize": True})
    with pytest.raises(AudioMoEError, match="exceeds the model's n_codebooks=4"):
        make("dac", num_quantizers=5)
    with pytest.raises(AudioMoEError, match=r"must lie in \[1, 4\]"):
        make("mimi", num_quantizers=6)
    with pytest.raises(AudioMoEError, match="bad config"):
        make("dac", config={"codebook_size": 100})  # not a power of 2


@pytest.fixture(scope="module")
def dac_corpus(tmp_path_factory):
    """``audiomoe data make --size tiny --codec dac --codec-path DIR`` with a random tiny DAC saved locally."""
    from transformers import DacConfig, DacModel

    from audiomoe.cli import main
    from audiomoe.codecs.dac import DAC

    root = tmp_path_factory.mktemp("dac_corpus")
    torch.manual_seed(7)
    DacModel(DacConfig(**DAC.tiny_config)).save_pretrained(root / "dac")
    argv = ["data", "make", str(root / "corpus"), "--size", "tiny", "--workers", "1"]
    assert main([*argv, "--codec", "dac", "--codec-path", str(root / "dac")]) == 0
    return root, argv


def test_data_make_writes_the_codec_tasks_as_dac_codes_beside_the_corpus(dac_corpus, capsys):
    import soundfile as sf

    from audiomoe.cli import main
    from audiomoe.data import read_manifest
    from audiomoe.data.loader import ItemDataset
    from audiomoe.train.predict import load_codec

    root, argv = dac_corpus
    codec = make("dac", pretrained=str(root / "dac"))
    folder = root / "corpus" / f"codes-dac-{codec.cache_key()}"
    items, _ = read_manifest(folder / "generation.jsonl")
    assert items and {it.task for it in items} == {"tts", "text_to_music"}
    sources, _ = read_manifest(root / "corpus" / "manifest.jsonl", only_tasks=["tts", "text_to_music"])
    for it, src in list(zip(items, sources))[:3]:
        codes = np.load(it.target["codes"])
        wav = ItemDataset([type(src)(audio=src.target["audio"], task=src.task)], codec.sample_rate).load(0, 0)
        info = sf.info(src.target["audio"])  # the target clip, resampled by the loader to the codec's 16 kHz
        assert abs(len(wav) - info.frames * 16000 / info.samplerate) <= 1
        assert codes.shape == (4, -(-len(wav) // 320))  # hop 320
        assert np.array_equal(codes, codec.encode(wav[None])[0][0].numpy())
    saved = json.loads((folder / "codec" / "dac.json").read_text())
    assert saved["pretrained"] == str((root / "dac").resolve())
    again = load_codec(folder)  # what predict decodes generated codes with
    codes = torch.from_numpy(np.load(items[0].target["codes"]).astype(np.int64))[None]
    assert torch.equal(again.decode(codes), codec.decode(codes))
    stamp = (folder / "generation.jsonl").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*argv, "--codec", "dac", "--codec-path", str(root / "dac")]) == 0  # cached: not made again
    assert (folder / "generation.jsonl").stat().st_mtime_ns == stamp and str(folder) in capsys.readouterr().out


def test_each_codec_and_config_gets_its_own_cache(dac_corpus):
    from audiomoe.data import codec_codes, read_manifest

    root, _ = dac_corpus
    manifest = root / "corpus" / "manifest.jsonl"
    a = codec_codes(manifest, make("encodec"))
    b = codec_codes(manifest, make("encodec", bandwidth=6.0))
    assert a.parent.name.startswith("codes-encodec-") and b.parent.name.startswith("codes-encodec-")
    assert a != b and len({p.name for p in (root / "corpus").glob("codes-*")}) == 3
    for gen, k in [(a, 3), (b, 13)]:  # bandwidth 1.5 and 6 kbps: 3 and 13 codebooks
        items, _ = read_manifest(gen)
        assert {np.load(it.target["codes"]).shape[0] for it in items} == {k}
    again = make("encodec")
    assert codec_codes(manifest, again) == a  # the same codec and weights: the cache


def test_data_make_refuses_bad_codec_flags_before_making_anything(tmp_path, capsys):
    from audiomoe.cli import main

    out = tmp_path / "corpus"
    for extra, msg in [
        (["--codec", "dac"], "needs --codec-path DIR"),
        (["--codec-path", str(tmp_path)], "need --codec NAME"),
        (["--codec", "mel_rvq", "--codec-param", "n_mels=40"], "only --codec-param num_codebooks"),
        (["--codec", "encodec", "--codec-path", str(tmp_path / "none")], "never downloads"),
    ]:
        assert main(["data", "make", str(out), "--size", "tiny", *extra]) == 2
        assert msg in capsys.readouterr().err and not out.exists()


def test_the_conformance_check_catches_a_codec_that_miscounts_its_codebooks():
    import sys
    import types

    from audiomoe import Registry
    from audiomoe.codecs.dac import DAC
    from audiomoe.testing import ConformanceError, check_component

    class Miscounted(DAC):
        """Declares one codebook more than it writes."""

        def _setup(self, config):
            super()._setup(config)
            self.num_codebooks += 1

    mod = types.ModuleType("miscounted_mod")
    mod.__doc__ = "A codec whose codes miss a declared codebook."
    Miscounted.__module__ = "miscounted_mod"
    mod.Miscounted = Miscounted
    plugin = types.ModuleType("miscounted_plugin")

    @audiomoe.hookimpl
    def audiomoe_register_components(register):
        register("codec", "miscounted", "miscounted_mod:Miscounted", "")

    plugin.audiomoe_register_components = audiomoe_register_components
    sys.modules["miscounted_mod"] = mod
    try:
        assert "codes [2, 4, 13]" in check_component("codec", "dac").checks[-1]
        with pytest.raises(ConformanceError, match=r"must be \[2, num_codebooks=5, F\], got \(2, 4, 13\)"):
            check_component("codec", "miscounted", registry=Registry.isolated(plugin))
    finally:
        del sys.modules["miscounted_mod"]
