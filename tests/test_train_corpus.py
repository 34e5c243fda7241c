"""The main job's data: `audiomoe train PRESET` trains on the built-in corpus when the heads are its tasks."""

from __future__ import annotations

import json

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
    with pytest.raises(audiomoe.AudioMoEError, match="not 'auto', 'builtin', 'tones' or an existing manifest"):
        _default_data(model, TrainConfig(data="nowhere.jsonl"))


def test_training_on_a_manifest_runs_and_evaluates_its_heads(tiny_corpus):
    result = train("tiny-corpus", [], TrainConfig(steps=6, batch_size=8, eval_every=6, eval_batches=2, progress=False, data=str(tiny_corpus)))
    assert result["steps"] == 6 and result["final_loss"] == result["final_loss"]  # finite
    assert {"language/accuracy", "speaker/accuracy"} <= set(result["eval_after"])
    assert result["data"]["items"] > 0 and result["data"]["bad_items"] == 0  # the loader's counts reach the summary


def test_resume_on_the_corpus_restores_the_sampler_and_ends_bit_identical(tiny_corpus, tmp_path):
    """3 steps + resume to 6 == 6 in one go: the checkpoint holds the loader's position (no replay)."""
    import torch
    from safetensors.torch import load_file

    def cfg(out, steps, **kw):
        return TrainConfig(steps=steps, batch_size=4, eval_every=100, eval_batches=1, progress=False, data=str(tiny_corpus), out_dir=str(out), **kw)

    train("tiny-corpus", [], cfg(tmp_path / "whole", 6))
    train("tiny-corpus", [], cfg(tmp_path / "split", 3))
    meta = json.loads(next((tmp_path / "split" / "step-000003").glob("trainer.json")).read_text())
    assert "data" in json.dumps(meta["extra"])  # the sampler state is in the checkpoint
    train("tiny-corpus", [], cfg(tmp_path / "split", 6, resume=True))
    a = load_file(str(tmp_path / "whole" / "step-000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "step-000006" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
