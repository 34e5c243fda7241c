"""A codec head on a real neural codec: unimoe-audio-tiny trains on DAC codes, predict writes WAVs and a listening page."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import audiomoe
from audiomoe.data import make_corpus, read_manifest
from audiomoe.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, "tiny", 0, progress=False)
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def tiny_dac(tmp_path_factory):
    """A random tiny DAC (4 codebooks x 64, hop 320 at 16 kHz) saved in Hugging Face layout, as a released one is."""
    from audiomoe.core.composer import component_builder

    path = tmp_path_factory.mktemp("dac")
    component_builder("codec", {"name": "dac", "params": {"seed": 3}})().model.save_pretrained(str(path))
    return path


def _dac_overrides(dac: Path, k: int = 4, v: int = 64) -> list[str]:
    return [
        f"tasks.codec.num_codebooks={k}",
        f"tasks.codec.codebook_size={v}",
        f"tasks.codec.delays=[{','.join(str(i) for i in range(k))}]",
        "tasks.codec.max_frames=6",
        "tasks.codec.min_frames=3",
        f"tasks.codec.codec={{name: dac, params: {{pretrained: '{dac}'}}}}",
    ]


def test_unimoe_tiny_trains_on_dac_codes_and_speaks_and_plays_through_one_codec_head(
    tiny_corpus, tiny_dac, monkeypatch, tmp_path
):
    import soundfile as sf

    import audiomoe.data as data_pkg
    from audiomoe.core.composer import component_builder
    from audiomoe.train.predict import predict_files

    monkeypatch.setattr(data_pkg, "builtin_corpus", lambda progress=True, **_: tiny_corpus)
    run = tmp_path / "run"
    cfg = TrainConfig(
        steps=2, batch_size=4, eval_every=100, eval_batches=0, progress=False, data="builtin", out_dir=str(run)
    )
    result = train("unimoe-audio-tiny", _dac_overrides(tiny_dac), cfg)
    assert result["steps"] == 2 and np.isfinite(result["final_loss"]) and result["final_loss"] > 0
    # the codes trained on are the DAC's, cached beside the corpus under its name and weights' key
    folders = sorted(tiny_corpus.parent.glob("codes-dac-*"))
    assert len(folders) == 1 and not list(tiny_corpus.parent.glob("codes-k4-v64"))
    dac = component_builder("codec", {"name": "dac", "params": {"pretrained": str(tiny_dac)}})()
    items, _ = read_manifest(folders[0] / "generation.jsonl")
    assert {it.task for it in items} == {"tts", "text_to_music"}
    target = read_manifest(tiny_corpus, only_tasks=["tts"])[0][0].target["audio"]
    first = next(it for it in items if it.task == "tts")
    from audiomoe.data.loader import ItemDataset
    from audiomoe.data.manifest import Item

    clip = ItemDataset([Item(audio=target, task="tts", origin="t")], dac.sample_rate).load(0, 0)  # as loaded
    want, _ = dac.encode(clip[None])
    assert np.array_equal(np.load(first.target["codes"]), want[0].numpy())  # the DAC's own codes of the target clip
    assert first.meta["reference_audio"] == str(Path(target).resolve())  # what eval's mel distance compares with

    voice = read_manifest(tiny_corpus, only_tasks=["speaker"])[0][0].audio
    out = tmp_path / "listen"
    rows = predict_files(str(run), [voice], prompt="a cat & a <dog>", out_dir=str(out))
    assert sorted(r["task"] for r in rows) == ["text_to_music", "tts"]
    for r in rows:
        codes = torch.from_numpy(np.load(r["codes"]))
        wav, sr = sf.read(r["wav"], dtype="float32")
        assert codes.shape[0] == 4 and 3 <= codes.shape[1] <= 6 and int(codes.max()) < 64
        decoded = dac.decode(codes[None])[0].numpy()
        assert sr == 16000 and len(wav) == len(decoded) > (codes.shape[1] - 1) * dac.hop  # the codec's rate and length
        assert np.abs(wav - decoded).max() <= 2 / 32768 and wav.std() > 0  # 16-bit PCM of the decoded audio
    page = (out / "index.html").read_text(encoding="utf-8")
    srcs = re.findall(r'<audio controls preload="metadata" src="([^"]+)">', page)
    assert sorted(srcs) == sorted(Path(r["wav"]).name for r in rows)  # every WAV, linked relative to the page
    assert page.count("a cat &amp; a &lt;dog&gt;") == 2 and "<dog>" not in page  # the prompt beside each, escaped
    assert "http" not in page and "<script" not in page  # no external assets

    # eval: the mel distance of the generated audio to the reference clip, per task, with its interval
    from audiomoe.train.evaluate import evaluate_checkpoint, format_report

    report = evaluate_checkpoint(str(run), "builtin", split="train", max_items=3)
    for task in ("tts", "text_to_music"):
        mel = report["tasks"][task]["mel_distance"]
        lo, hi = report["interval"][task]["mel_distance"]
        assert report["items"][task] == 3 and 0.1 < mel < 20 and lo < mel < hi, (task, mel, lo, hi)
    assert "mel_distance 95% interval" in format_report(report)
    assert "asr_wer" not in report["tasks"]["tts"]  # no ASR head and no --asr-run: no WER

    # --asr-run: a CTC ASR run transcribes the generated speech; WER against the tts prompt text
    from audiomoe.data.loader import ItemDataset
    from audiomoe.data.manifest import Item
    from audiomoe.train.checkpoint import load_checkpoint, resolve_checkpoint
    from audiomoe.train.codec_audio import transcribe

    asr_run = tmp_path / "asr"
    train(
        "tiny-ctc",
        [],
        TrainConfig(steps=1, batch_size=4, eval_batches=0, progress=False, data="builtin", out_dir=str(asr_run)),
    )
    report = evaluate_checkpoint(str(run), "builtin", split="train", max_items=3, asr_run=str(asr_run))
    wer = report["tasks"]["tts"]["asr_wer"]
    assert 0.0 <= wer < 100 and "asr_wer" not in report["tasks"]["text_to_music"]  # music is not transcribed
    asr = load_checkpoint(str(resolve_checkpoint(str(asr_run)))).eval()
    clips = [it.audio for it in read_manifest(tiny_corpus, only_tasks=["asr"])[0][:2]]
    heard = transcribe(
        asr, [ItemDataset([Item(audio=c, task="asr", origin=c)], 16000).load(0, 0) for c in clips], 16000
    )
    assert all(heard) and len(set(heard)) == 2  # real, distinct transcripts (an untrained CTC head babbles)
    assert heard == [r["prediction"] for r in predict_files(str(asr_run), clips, out_dir=str(tmp_path / "p"))]
    with pytest.raises(audiomoe.AudioMoEError, match="the ASR model has no 'asr' head"):
        transcribe(load_checkpoint(str(resolve_checkpoint(str(run)))), clips[:1], 16000)


def test_mel_distance_is_zero_on_itself_log4_at_half_amplitude_and_scores_codes_against_the_reference(
    tiny_corpus, tiny_dac
):
    import math

    from audiomoe.core.composer import component_builder
    from audiomoe.data.loader import ItemDataset
    from audiomoe.data.manifest import Item
    from audiomoe.train.codec_audio import codec_scores, mel_distance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8000, generator=g)
    assert mel_distance(x, x, 16000) == 0.0
    assert mel_distance(x, torch.cat([x, torch.randn(4000, generator=g)]), 16000) == 0.0  # cropped to the shorter
    assert abs(mel_distance(0.5 * x, x, 16000) - math.log(4)) < 0.01  # power halves twice: log 4 per bin
    assert mel_distance(torch.zeros(0), x, 16000) == pytest.approx(mel_distance(torch.zeros(8000), x, 16000))

    model = audiomoe.compose("unimoe-audio-tiny", _dac_overrides(tiny_dac))
    dac = component_builder("codec", {"name": "dac", "params": {"pretrained": str(tiny_dac)}})()
    ref_path = read_manifest(tiny_corpus, only_tasks=["tts"])[0][0].target["audio"]
    ref = ItemDataset([Item(audio=ref_path, task="tts", origin="r")], 16000).load(0, 0)
    codes = dac.encode(ref[None])[0][0]
    with_ref = Item(audio=ref_path, task="tts", origin="a", meta={"reference_audio": ref_path})
    without = Item(audio=ref_path, task="tts", origin="b")
    scores = codec_scores(model, {"tts": [([codes], codes, with_ref), ([codes], codes, without)]})
    resynth = mel_distance(dac.decode(codes[None])[0], ref, 16000)  # the codec's resynthesis distance
    assert resynth > 0.05 and scores["tts"]["items"] == 2
    assert scores["tts"]["mel_distance"] == pytest.approx(resynth / 2, abs=1e-5)  # the other: its own decode, 0


def test_a_codec_head_whose_layout_disagrees_with_its_codec_is_refused_naming_both(tiny_corpus, tiny_dac):
    from audiomoe.train.data import corpus_paths

    model = audiomoe.compose("unimoe-audio-tiny", _dac_overrides(tiny_dac, k=4, v=16))
    with pytest.raises(
        audiomoe.AudioMoEError,
        match=r"head 'tts' writes 4 codebooks x 16 codes but its codec 'dac' has 4 x 64; .*codebook_size=64",
    ):
        corpus_paths(model, str(tiny_corpus), ["tts"])
