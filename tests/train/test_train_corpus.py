"""The main job's data: `audiomoe train PRESET` trains on the built-in corpus when the heads are its tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import audiomoe
from audiomoe.data import make_corpus
from audiomoe.data.corpus.make import UNDERSTANDING_TASKS
from audiomoe.train import TrainConfig, train
from audiomoe.train.loop import _default_data


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, "tiny", 0, progress=False)
    return root / "manifest.jsonl"


def test_understanding_tasks_are_the_corpus_tasks(tiny_corpus):
    info = json.loads((tiny_corpus.parent / "corpus.json").read_text())["tasks"]
    assert set(UNDERSTANDING_TASKS) == {t for t, v in info.items() if v["head"] in ("classification", "ctc_asr")}
    preset = audiomoe.compose("tiny-corpus")
    for name in preset.task_names:  # the main job's heads carry the corpus's own label names
        assert preset.heads[name].params.labels == info[name]["labels"]


def test_auto_picks_the_corpus_for_corpus_heads_and_tones_otherwise(tiny_corpus, monkeypatch):
    model = audiomoe.compose("tiny-corpus")
    data, eval_data = _default_data(model, TrainConfig(data=str(tiny_corpus), batch_size=4, eval_batches=2))
    batch = next(data)
    assert set(batch.task_list()) <= set(model.task_names) and all(isinstance(t, str) for t in batch.targets)
    assert len(eval_data) == 2
    monkeypatch.setenv("AUDIOMOE_CACHE", str(tiny_corpus.parent / "no-such-cache"))
    tones = audiomoe.compose("tiny-moe-cls")  # heads 'emotion', 'speaker': not all corpus tasks -> tones
    data, _ = _default_data(tones, TrainConfig(batch_size=4, eval_batches=1))
    assert next(data).sample_rate == 16000 and not (tiny_corpus.parent / "no-such-cache").exists()
    with pytest.raises(audiomoe.AudioMoEError, match="not 'auto', 'builtin', 'tones', an existing manifest"):
        _default_data(model, TrainConfig(data="nowhere.jsonl"))


def test_training_on_a_manifest_runs_and_evaluates_its_heads(tiny_corpus):
    result = train(
        "tiny-corpus",
        [],
        TrainConfig(steps=6, batch_size=8, eval_every=6, eval_batches=2, progress=False, data=str(tiny_corpus)),
    )
    assert result["steps"] == 6 and result["final_loss"] == result["final_loss"]  # finite
    assert {"language/accuracy", "speaker/accuracy"} <= set(result["eval_after"])
    assert result["data"]["items"] > 0 and result["data"]["bad_items"] == 0  # the loader's counts reach the summary


def test_resume_on_the_corpus_restores_the_sampler_and_ends_bit_identical(tiny_corpus, tmp_path):
    """3 steps + resume to 6 == 6 in one go: the checkpoint holds the loader's position (no replay). A constant lr: under
    a decaying schedule a 3-step run's steps would follow another lr than the 6-step run's."""
    import torch
    from safetensors.torch import load_file

    def cfg(out, steps, **kw):
        return TrainConfig(
            steps=steps,
            batch_size=4,
            eval_every=100,
            eval_batches=1,
            progress=False,
            data=str(tiny_corpus),
            out_dir=str(out),
            schedule="constant",
            **kw,
        )

    train("tiny-corpus", [], cfg(tmp_path / "whole", 6))
    train("tiny-corpus", [], cfg(tmp_path / "split", 3))
    meta = json.loads(next((tmp_path / "split" / "step-000003").glob("trainer.json")).read_text())
    assert "data" in json.dumps(meta["extra"])  # the sampler state is in the checkpoint
    train("tiny-corpus", [], cfg(tmp_path / "split", 6, resume=True))
    a = load_file(str(tmp_path / "whole" / "step-000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "step-000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SMALL_CODEC = [
    "tasks.tts.num_codebooks=4",
    "tasks.tts.codebook_size=16",
    "tasks.tts.delays=[0,1,2,3]",
    "tasks.tts.max_frames=8",
]


def test_every_paper_preset_trains_on_the_corpus_by_default():
    """`audiomoe train PRESET` with no --data: the text and codec heads of the paper presets are corpus tasks."""
    from audiomoe.train.data import resolve_choice

    for preset in ("mowe-audio-tiny", "unimoe-audio-tiny", "mowe-unimoe-tiny", "tiny-corpus"):
        assert resolve_choice(audiomoe.compose(preset), "auto") == "builtin", preset


def test_codec_heads_read_codes_of_the_voice_prompted_pairs_made_once_for_their_layout(tiny_corpus):
    import numpy as np

    from audiomoe.data import read_manifest
    from audiomoe.train.data import corpus_paths

    model = audiomoe.compose("unimoe-audio-tiny", [s.replace("tasks.tts.", "tasks.codec.") for s in SMALL_CODEC])
    paths = corpus_paths(model, str(tiny_corpus), ["tts"])
    gen = paths["tts"]
    assert gen.endswith("codes-k4-v16/generation.jsonl")
    items, _ = read_manifest(gen)
    source, _ = read_manifest(tiny_corpus, only_tasks=["tts", "text_to_music"])  # one codec, one manifest, for both
    assert items and len(items) == len(source)
    for it, src in zip(items, source):
        codes = np.load(it.target["codes"])
        assert (
            codes.shape[0] == 4 and codes.max() < 16 and it.audio == src.audio != src.target["audio"]
        )  # input: the voice prompt
    stamp = (tiny_corpus.parent / "codes-k4-v16" / "generation.jsonl").stat().st_mtime_ns
    assert corpus_paths(model, str(tiny_corpus), ["tts"]) == paths  # cached: not fitted again
    assert (tiny_corpus.parent / "codes-k4-v16" / "generation.jsonl").stat().st_mtime_ns == stamp
    wrong = audiomoe.compose("tiny-corpus", ["tasks.tts=classification", "tasks.tts.num_classes=2"])
    with pytest.raises(
        audiomoe.AudioMoEError, match="corpus task 'tts' has codec-code targets, but head 'tts' \\(classification\\)"
    ):
        corpus_paths(wrong, str(tiny_corpus), ["tts"])


def test_builtin_training_feeds_text_and_codec_heads_of_one_llm(tiny_corpus, monkeypatch, tmp_path, caplog):
    """mowe-unimoe-tiny (ASR text head + TTS codec head on one LLM) trains on 'builtin' (here: the tiny corpus).

    The tiny corpus has no held-out voice-prompted pair: tts trains, is named on the log and not evaluated.
    """
    import audiomoe.data as data_pkg

    monkeypatch.setattr(
        data_pkg, "builtin_corpus", lambda progress=True, **_: tiny_corpus
    )  # the small corpus takes 15 s to make
    cfg = TrainConfig(
        steps=4,
        batch_size=8,
        eval_every=4,
        eval_batches=1,
        progress=False,
        data="builtin",
        out_dir=str(tmp_path / "run"),
        logs=True,
    )
    with caplog.at_level("WARNING", logger="audiomoe.train"):
        result = train("mowe-unimoe-tiny", SMALL_CODEC, cfg)
    assert result["steps"] == 4 and result["final_loss"] == result["final_loss"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    tts = [s["losses"]["task/tts"] for s in steps if "losses" in s and "task/tts" in s["losses"]]
    assert tts and all(v > 1.0 for v in tts), "the codec head trains on the corpus's pairs (4 codebooks x ln 19)"
    assert any(k.startswith("asr/") for k in result["eval_after"]) and not any(
        k.startswith("tts/") for k in result["eval_after"]
    )
    assert "no held-out ('test' split) items for task(s) tts" in caplog.text


@pytest.mark.slow
def test_the_unimoe_preset_trains_and_evaluates_tts_on_the_small_corpus(tmp_path):
    """The real command on the real small corpus: `audiomoe train unimoe-audio-tiny` (12 x 1024 codes) then `audiomoe eval`."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "AUDIOMOE_CACHE": str(tmp_path / "cache")}
    run = [
        sys.executable,
        "-m",
        "audiomoe",
        "train",
        "unimoe-audio-tiny",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",  # one codec head serves tts and music: the first eval batch holds music only, the second tts
        "--out",
        str(tmp_path / "run"),
        "--quiet",
    ]
    subprocess.run(run, check=True, env=env, timeout=900)
    from audiomoe.data.corpus.make import VERSION

    assert (tmp_path / "cache" / f"corpus-v{VERSION}-small-seed0" / "codes-k12-v1024" / "generation.jsonl").exists()
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert {"tts/code_accuracy", "tts/length_error"} <= set(last["eval"])
    out = subprocess.run(
        [sys.executable, "-m", "audiomoe", "eval", str(tmp_path / "run"), "--max-items", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    assert "tts" in out.stdout and "code_accuracy" in out.stdout


def test_the_unimoe_audio_curriculum_runs_on_speech_and_music_specialists(tiny_corpus, monkeypatch, tmp_path):
    """The built-in recipe, three stages a few steps each: the MoE LM is built from a speech and a music LM specialist."""
    import audiomoe.data as data_pkg
    from audiomoe.train.recipe import load_recipe
    from audiomoe.train.trainer import RunOptions, run_recipe

    monkeypatch.setattr(data_pkg, "builtin_corpus", lambda progress=True, **_: tiny_corpus)
    small = SMALL_CODEC + [s.replace("tasks.tts.", "tasks.text_to_music.") for s in SMALL_CODEC]
    sets = small + [
        "stages.0.steps=2",
        "stages.1.steps=2",
        "stages.2.steps=2",
        "eval.every=2",
        "eval.batches=1",
        "batch_size=4",
    ]
    summary = run_recipe(
        load_recipe("unimoe-audio-curriculum-tiny", sets),
        RunOptions(out_dir=str(tmp_path / "run"), progress=False, device="cpu"),
    )
    init = summary["stages"][1]["init"]
    assert [s["member"] for s in summary["stages"][0]["specialists"]] == ["speech", "music"]
    assert (
        init["heads_from"] == {"tts": 0, "text_to_music": 1} and len(init["moe_layers"]) == 2
    )  # every LM layer is an MoE
    assert summary["steps"] == 4
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    joint = {k for s in steps if s.get("stage") == "joint" for k in s.get("losses", {})}
    assert {"task/tts", "task/text_to_music"} <= joint, joint  # the joint stage trains both domains on one MoE LM


def test_predict_gives_labels_text_and_listenable_codec_audio(tiny_corpus, monkeypatch, tmp_path):
    """`audiomoe predict RUN AUDIO`: label names, generated text, and codes decoded to a .wav by the corpus's codec."""
    import subprocess
    import sys

    import soundfile as sf

    import audiomoe.data as data_pkg
    from audiomoe.data import read_manifest
    from audiomoe.train.predict import predict_files

    monkeypatch.setattr(data_pkg, "builtin_corpus", lambda progress=True, **_: tiny_corpus)
    for preset, over in (("mowe-unimoe-tiny", SMALL_CODEC), ("tiny-corpus", [])):
        train(
            preset,
            over,
            TrainConfig(
                steps=1,
                batch_size=4,
                eval_every=100,
                eval_batches=0,
                progress=False,
                data="builtin",
                out_dir=str(tmp_path / preset),
            ),
        )
    clip = read_manifest(tiny_corpus, only_tasks=["speaker"])[0][0].audio
    codec = tiny_corpus.parent / "codes-k4-v16"
    rows = predict_files(str(tmp_path / "mowe-unimoe-tiny"), [clip], prompt="the cat sleeps", codec=str(codec))
    by_task = {r["task"]: r for r in rows}
    assert set(by_task) == {"asr", "tts"} and isinstance(by_task["asr"]["prediction"], str)
    wav, sr = sf.read(by_task["tts"]["wav"])
    frames = np.load(by_task["tts"]["codes"]).shape[1]
    assert (
        sr == 16000 and len(wav) == (frames - 1) * 256 and 1 <= frames <= 8 and np.isfinite(wav).all()
    )  # max_frames=8
    from audiomoe.train.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        str(tmp_path / "mowe-unimoe-tiny"), "builtin", split="train", max_items=2
    )  # codes loaded for the codec head
    assert set(report["tasks"]) == {"asr", "tts"} and report["items"] == {"asr": 2, "tts": 2}
    assert "code_accuracy" in report["tasks"]["tts"] and "wer" in report["tasks"]["asr"]
    labels = predict_files(str(tmp_path / "tiny-corpus"), [clip])
    model = audiomoe.compose("tiny-corpus")
    for r in labels:
        assert r["prediction"] in model.heads[r["task"]].params.labels, r
    with pytest.raises(audiomoe.AudioMoEError, match="task\\(s\\) \\['tts'\\] are not heads of this model"):
        predict_files(str(tmp_path / "tiny-corpus"), [clip], tasks=["tts"])
    with pytest.raises(audiomoe.AudioMoEError, match="audio file 'nowhere.wav' does not exist"):
        predict_files(str(tmp_path / "tiny-corpus"), ["nowhere.wav"])
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.wav", "sub/b.wav"):
        (folder / name).write_bytes(Path(clip).read_bytes())
    (folder / "notes.txt").write_text("not audio")
    rows = predict_files(str(tmp_path / "tiny-corpus"), [str(folder)])
    assert sorted({r["audio"] for r in rows}) == [str(folder / "a.wav"), str(folder / "sub" / "b.wav")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(audiomoe.AudioMoEError, match="holds no audio files"):
        predict_files(str(tmp_path / "tiny-corpus"), [str(tmp_path / "empty")])
    with pytest.raises(audiomoe.AudioMoEError, match="no fitted codec in"):
        predict_files(str(tmp_path / "mowe-unimoe-tiny"), [clip], tasks=["tts"], codec=str(tmp_path))
    cli = subprocess.run(
        [sys.executable, "-m", "audiomoe", "predict", str(tmp_path / "tiny-corpus"), clip, "--task", "speaker"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "[speaker]  spk" in cli.stdout


def _cache_rank(rank: int, port: int, manifest: str, out: str) -> None:
    """One of two gloo ranks asking for the same codec codes through rank_zero_first."""
    import datetime
    from pathlib import Path

    import torch.distributed as dist

    from audiomoe.data import corpus_codes
    from audiomoe.train.data import rank_zero_first

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120)
    )
    made = Path(manifest).parent / "codes-k2-v8" / "generation.jsonl"

    def fn():
        existed = made.exists()
        return existed, str(corpus_codes(manifest, 2, 8))

    existed, path = rank_zero_first(rank, 2, fn)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"existed": existed, "path": path}))
    dist.destroy_process_group()


def test_rank_zero_makes_the_codec_codes_and_the_other_rank_finds_them(tiny_corpus, tmp_path):
    """Two real gloo processes: rank 1 enters only after rank 0 made the cache (no duplicated fit, no race)."""
    import torch.multiprocessing as mp

    from audiomoe.train.distributed import free_port

    mp.spawn(_cache_rank, args=(free_port(), str(tiny_corpus), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == {"existed": False, "path": r1["path"]} and r1["existed"] is True
