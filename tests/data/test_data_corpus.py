"""The built-in corpus: real eSpeak NG synthesis, same bytes for the same seed, loadable, cached once."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from audiomoe.data import build_loader, builtin_corpus, make_corpus
from audiomoe.data.corpus.make import COUNTS
from audiomoe.data.corpus.speech import Espeak


def digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, "tiny", seed=3, workers=1, progress=False)
    return root


def test_espeak_speaks_languages_and_is_repeatable():
    es = Espeak.get()
    a = es.synth("the cat sees a dog", "en+m3", rate=170, pitch=40)
    es.synth("das haus ist sehr groß", "de+f2", rate=190, pitch=70)
    assert es.sample_rate == 22050 and 0.5 < len(a) / es.sample_rate < 3
    assert np.array_equal(a, es.synth("the cat sees a dog", "en+m3", rate=170, pitch=40))  # no state carried over
    high = es.synth("the cat sees a dog", "en+m3", rate=170, pitch=90)
    fast = es.synth("the cat sees a dog", "en+m3", rate=300, pitch=40)
    assert len(fast) < 0.75 * len(a) and not np.array_equal(high, a)


def test_same_seed_same_bytes_any_worker_count(tiny, tmp_path):
    make_corpus(tmp_path / "again", "tiny", seed=3, workers=2, progress=False)
    assert digest(tiny) == digest(tmp_path / "again")
    make_corpus(tmp_path / "other", "tiny", seed=4, workers=1, progress=False)
    other = digest(tmp_path / "other")
    assert other.keys() == digest(tiny).keys() and other["manifest.jsonl"] != digest(tiny)["manifest.jsonl"]


def test_corpus_tasks_labels_and_loading(tiny):
    info = json.loads((tiny / "corpus.json").read_text())
    lines = [json.loads(x) for x in (tiny / "manifest.jsonl").read_text().splitlines()]
    tasks = {x["task"] for x in lines}
    assert tasks == set(info["tasks"])
    for name, t in info["tasks"].items():
        if t["head"] == "classification":
            assert {x["target"] for x in lines if x["task"] == name} <= set(t["labels"]), name
    assert {x["split"] for x in lines} == {"train", "test"}
    qa = next(x for x in lines if x["task"] == "qa" and x["prompt"]["question"] == "Which language is spoken?")
    assert qa["target"] in info["tasks"]["language"]["labels"]
    assert len({x["audio"] for x in lines}) == info["clips"] == sum(max(int(n * 0.05), 11) for n in COUNTS.values())
    loader = build_loader(
        {
            "sources": {"c": {"path": str(tiny / "manifest.jsonl"), "only_tasks": ["asr", "speaker"]}},
            "max_seconds": 20,
            "num_workers": 0,
        }
    )
    batch = next(iter(loader))
    assert batch.sample_rate == 16000 and set(batch.tasks) <= {"asr", "speaker"}
    assert float(batch.waveforms.abs().max()) > 0.05


def test_builtin_corpus_is_made_once_into_the_cache(tmp_path, monkeypatch):
    import audiomoe.data.corpus.make as mk

    calls = []
    real = mk.make_corpus
    monkeypatch.setattr(mk, "make_corpus", lambda *a, **k: calls.append(a) or real(*a, **{**k, "workers": 1}))
    first = builtin_corpus(tmp_path, size="tiny", progress=False)
    again = builtin_corpus(tmp_path, size="tiny", progress=False)
    assert first == again and first.exists() and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == [f"corpus-v{mk.VERSION}-tiny-seed0"]  # no temp dir left behind


def test_cli_data_make(tmp_path, capsys):
    from audiomoe.cli import main

    assert main(["data", "make", str(tmp_path / "c"), "--size", "tiny", "--seed", "3", "--workers", "1"]) == 0
    assert "clips" in capsys.readouterr().out
    assert (tmp_path / "c" / "manifest.jsonl").exists()
