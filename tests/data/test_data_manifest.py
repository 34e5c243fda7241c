"""Manifests, sources and the data config: every bad input is a named error (file and line), or skipped and counted.

Real files on disk: wavs written with soundfile into tmp_path, a local HF dataset saved with
``save_to_disk``, an audiofolder directory, a CSV of labels.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from audiomoe.core.errors import AudioMoEError, ConfigError
from audiomoe.data import build_loader, load_data_spec, manifest_from_csv, read_manifest


def wav(path, seconds=0.5, sr=16000, value=None, seed=0):
    """Write a float wav (``value`` fills it, e.g. NaN) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).standard_normal(int(seconds * sr)).astype(np.float32) * 0.1
    if value is not None:
        x[:] = value
    sf.write(path, x, sr, subtype="FLOAT")
    return path


def manifest(tmp_path, lines, name="m.jsonl"):
    p = tmp_path / name
    p.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return p


def good(i=0, task="cls"):
    return {"audio": f"wav/{i}.wav", "task": task, "target": "a"}


@pytest.fixture
def wavs(tmp_path):
    for i in range(4):
        wav(tmp_path / "wav" / f"{i}.wav", seed=i)
    return tmp_path


def test_reads_fields_relative_paths_and_header_durations(wavs):
    p = manifest(
        wavs,
        [
            good(0),
            {
                "audio": "wav/1.wav",
                "task": "asr",
                "target": "hi",
                "offset": 0.1,
                "duration": 0.2,
                "prompt": "q",
                "dataset": "d",
                "split": "test",
                "meta": {"x": 1},
            },
        ],
    )
    items, bad = read_manifest(p)
    assert bad == [] and len(items) == 2
    assert items[0].duration == pytest.approx(0.5) and items[0].audio == str(wavs / "wav" / "0.wav")
    assert (items[1].offset, items[1].duration, items[1].prompt, items[1].split, items[1].meta) == (
        0.1,
        0.2,
        "q",
        "test",
        {"x": 1},
    )
    assert items[1].origin.endswith("m.jsonl:2")
    assert [i.task for i in read_manifest(p, split="test")[0]] == ["asr"]
    assert [i.task for i in read_manifest(p, only_tasks=["cls"])[0]] == ["cls"]


@pytest.mark.parametrize(
    "line, message",
    [
        ({"audio": "wav/nope.wav", "task": "cls"}, r"m\.jsonl:2: audio file '.*nope\.wav' does not exist"),
        ({"audio": "wav/0.wav", "task": "cls", "labl": "a"}, r"m\.jsonl:2: unknown column\(s\) \['labl'\]"),
        ({"audio": "wav/0.wav", "task": "clss"}, r"m\.jsonl:2: unknown task 'clss'\. Did you mean 'cls'\?"),
        ({"audio": "wav/0.wav", "task": "cls", "duration": 0}, r"m\.jsonl:2: zero-length clip"),
        ('{"audio": "wav/0.wav", ', r"m\.jsonl:2: not valid JSON"),
        ({"task": "cls"}, r"m\.jsonl:2: 'audio' .* is required"),
    ],
    ids=["missing-file", "unknown-column", "unknown-task", "zero-length", "bad-json", "no-audio"],
)
def test_bad_lines_name_file_and_line(wavs, line, message):
    p = manifest(wavs, [good(0), line, good(1)])
    with pytest.raises(AudioMoEError, match=message):
        read_manifest(p, tasks=["cls", "asr"])
    items, bad = read_manifest(p, tasks=["cls", "asr"], skip_bad=True)
    assert len(items) == 2 and len(bad) == 1 and "m.jsonl:2" in bad[0]


def test_corrupt_file_named_at_index_time(wavs):
    (wavs / "wav" / "bad.wav").write_bytes(b"RIFF\x00\x00not really a wav file")
    p = manifest(wavs, [good(0), {"audio": "wav/bad.wav", "task": "cls"}])
    with pytest.raises(AudioMoEError, match=r"m\.jsonl:2: cannot read audio file '.*bad\.wav' \(corrupt"):
        read_manifest(p)


def test_empty_manifest(tmp_path):
    p = manifest(tmp_path, [])
    with pytest.raises(AudioMoEError, match=r"manifest '.*m\.jsonl' is empty"):
        read_manifest(p)


def test_nan_zero_and_corrupt_clips_fail_at_decode_or_are_skipped_and_counted(wavs):
    wav(wavs / "wav" / "nan.wav", value=np.nan)
    sf.write(wavs / "wav" / "empty.wav", np.zeros(0, np.float32), 16000)
    (wavs / "wav" / "trunc.wav").write_bytes((wavs / "wav" / "0.wav").read_bytes()[:30])
    nan_line = {"audio": "wav/nan.wav", "task": "cls", "target": "a"}
    p = manifest(wavs, [good(0), nan_line, good(1)])
    cfg = {"sources": {"s": {"path": str(p)}}, "num_workers": 0, "max_seconds": 10}
    with pytest.raises(AudioMoEError, match=r"m\.jsonl:2: clip '.*nan\.wav' contains NaN"):
        list(build_loader(cfg))
    # Declared durations skip the header read, so these fail in the (worker) decode instead.
    p = manifest(wavs, [good(0), {**nan_line, "audio": "wav/empty.wav", "duration": 0.5}], "z.jsonl")
    with pytest.raises(AudioMoEError, match=r"z\.jsonl:2: zero-length clip"):
        list(build_loader({**cfg, "sources": {"s": {"path": str(p)}}, "num_workers": 1}))
    p = manifest(wavs, [good(0), nan_line, {**nan_line, "audio": "wav/trunc.wav", "duration": 0.5}, good(1)], "k.jsonl")
    loader = build_loader({**cfg, "sources": {"s": {"path": str(p)}}, "skip_bad": True})
    with pytest.warns(RuntimeWarning, match=r"skipped 2 bad item\(s\) in epoch 0"):
        n = sum(len(b.tasks) for b in loader)
    assert n == 2 and loader.summary()["bad_items"] == 2


def test_data_config_reports_every_problem_with_dotted_keys(wavs):
    p = manifest(wavs, [good(0)])
    cfg = {
        "max_seconds": -1,
        "sampling": {"mode": "temprature"},
        "sources": {
            "a": {"path": str(p), "weight": 0},
            "b": {"type": "manifets", "path": str(p)},
            "c": {"path": "nowhere.jsonl", "splt": "x"},
            "d": {},
        },
    }
    with pytest.raises(ConfigError) as e:
        load_data_spec(cfg)
    text = str(e.value)
    for key in (
        "data.max_seconds",
        "data.sampling.mode",
        "data.sources.a.weight",
        "data.sources.b",
        "data.sources.c.splt",
        "data.sources.d.path",
    ):
        assert key in text, (key, text)
    assert "Did you mean 'manifest'" in text
    spec, sources = load_data_spec({"data": {"sources": {"a": {"path": "m.jsonl"}}}}, base_dir=wavs)
    assert sources["a"].params.path == str(wavs / "m.jsonl") and spec.sampling.mode == "natural"


def test_csv_helper_and_cli(wavs, tmp_path, capsys):
    import shlex

    import audiomoe
    from audiomoe.cli import main

    (wavs / "wav" / "labels.csv").write_text("file,label,split,speaker\n0.wav,dog,train,s1\n1.wav,cat,test,\n")
    out = manifest_from_csv(wavs / "wav" / "labels.csv", wavs / "own.jsonl", task="animal")
    items, _ = read_manifest(out)
    assert [(i.target, i.split, i.meta) for i in items] == [("dog", "train", {"speaker": "s1"}), ("cat", "test", {})]
    assert (
        main(["data", "from-csv", str(wavs / "wav" / "labels.csv"), str(tmp_path / "cli.jsonl"), "--task", "animal"])
        == 0
    )
    assert (tmp_path / "cli.jsonl").read_text() == out.read_text()
    # the printed flags give a head that reads the manifest: its labels in order, as class indices
    hint = capsys.readouterr().out.splitlines()[-1]
    overrides = [a for a in shlex.split(hint.split(": ", 1)[1]) if a != "--set"]
    model = audiomoe.compose("tiny-cls", ["tasks.cls=null", *overrides])
    assert model.task_names == ["animal"] and model.heads["animal"].make_targets(
        ["cat", "dog"], torch.device("cpu")
    ).tolist() == [0, 1]
    # a model whose heads have other names is told which tasks the manifest has
    with pytest.raises(
        AudioMoEError, match=r"no items with split 'train' for task\(s\) \['cls'\], only for 'animal' \(1\)"
    ):
        read_manifest(out, split="train", only_tasks=["cls"])


def test_hf_saved_dataset_and_audiofolder(wavs):
    datasets = pytest.importorskip("datasets")
    paths = [str(wavs / "wav" / f"{i}.wav") for i in range(4)]
    ds = datasets.Dataset.from_dict({"audio": paths, "label": [0, 1, 0, 1], "q": ["x"] * 4})
    ds = ds.cast_column("audio", datasets.Audio()).cast_column("label", datasets.ClassLabel(names=["dog", "cat"]))
    ds.save_to_disk(str(wavs / "hf"))
    (wavs / "wav" / "metadata.csv").write_text("file_name,label\n0.wav,dog\n1.wav,cat\n")
    cfg = {
        "num_workers": 0,
        "max_seconds": 100,
        "sources": {
            "saved": {"type": "hf", "path": str(wavs / "hf"), "task": "animal", "prompt_column": "q"},
            "folder": {"type": "hf", "path": str(wavs / "wav"), "task": "animal"},
        },
    }
    batches = list(build_loader(cfg))
    got = sorted(t for b in batches for t in b.targets)
    assert got == sorted(["dog", "cat", "dog", "cat", "dog", "cat"])
    with pytest.raises(AudioMoEError, match=r"unknown column 'lable'\. Did you mean 'label'\?"):
        build_loader(
            {**cfg, "sources": {"s": {"type": "hf", "path": str(wavs / "hf"), "task": "a", "target_column": "lable"}}}
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(build_loader({**cfg, "sources": {"f": cfg["sources"]["folder"]}}).dataset) == 2


class GlobSource:
    """A plugin's data source: every wav under a folder, label = file stem (defined in this test module)."""

    from audiomoe.core.specs import Params as _P

    class Params(_P):
        folder: str = ""

    def __init__(self, params):
        self.params = params

    def problems(self):
        return [] if self.params.folder else [("folder", "required")]

    def items(self, *, task, tasks, skip_bad):
        from pathlib import Path

        from audiomoe.data import Item

        files = sorted(Path(self.params.folder).glob("*.wav"))
        return [Item(str(f), task or "glob", f.stem, duration=sf.info(f).duration, origin=str(f)) for f in files], []


def test_a_plugin_adds_a_data_source(wavs):
    import types

    import audiomoe
    from audiomoe import Registry

    plugin = types.ModuleType("glob_plugin")

    @audiomoe.hookimpl
    def audiomoe_register_components(register):
        register("data_source", "glob", f"{__name__}:GlobSource", "wavs in a folder")

    plugin.audiomoe_register_components = audiomoe_register_components
    reg = Registry.isolated(plugin)
    loader = build_loader(
        {"num_workers": 0, "sources": {"g": {"type": "glob", "folder": str(wavs / "wav")}}}, registry=reg
    )
    assert sorted(t for b in loader for t in b.targets) == ["0", "1", "2", "3"]
    with pytest.raises(ConfigError, match=r"data\.sources\.g\.folder: required"):
        build_loader({"sources": {"g": {"type": "glob"}}}, registry=reg)


def test_training_crops_only_clip_level_labels_never_a_transcripts_clip(tmp_path):
    """A long clip of a label task is cropped to the training window; one with a transcript stays whole."""
    from audiomoe.core.composer import compose
    from audiomoe.train.data import build_data

    wav(tmp_path / "wav" / "long.wav", seconds=8.0)
    lines = [
        {"audio": "wav/long.wav", "task": "asr", "target": "hello there", "split": "train"},
        {"audio": "wav/long.wav", "task": "emotion", "target": 1, "split": "train"},
    ]
    p = manifest(tmp_path, lines)
    model = compose("tiny-multitask", ["tasks.tags=null", "tasks.llm=null"])
    assert {t: h.clip_level for t, h in model.heads.items()} == {"emotion": True, "asr": False}
    stream, _ = build_data(model, str(p), None, batch_size=2, seed=0, eval_batches=0)
    seen = {}
    for _ in range(4):
        batch = next(stream)
        for task, n in zip(batch.tasks, batch.lengths.tolist()):
            seen[task] = n / batch.sample_rate
    assert seen["asr"] == pytest.approx(8.0) and seen["emotion"] == pytest.approx(5.0)
    # the loader's own rule: crop_tasks names the croppable tasks, None crops every task
    items, _ = read_manifest(p)
    spec = {"sources": {"m": {"path": str(p)}}, "max_clip_seconds": 2.0, "num_workers": 0}
    lengths = lambda cfg: sorted(n for b in build_loader(cfg) for n in b.lengths.tolist())
    assert lengths(spec) == [32000, 32000]
    assert lengths({**spec, "crop_tasks": ["emotion"]}) == [32000, 128000]


def test_a_head_without_training_items_is_refused_naming_it_and_the_fix(tmp_path):
    """Items of a head's task only in the test split: refused (it would stay random), with the --set that drops it."""
    from audiomoe.core.composer import compose
    from audiomoe.train.data import build_data

    wav(tmp_path / "wav" / "a.wav")
    lines = [
        {"audio": "wav/a.wav", "task": "emotion", "target": 1, "split": "train"},
        {"audio": "wav/a.wav", "task": "asr", "target": "hi", "split": "test"},
    ]
    model = compose("tiny-multitask", ["tasks.tags=null", "tasks.llm=null"])
    with pytest.raises(
        AudioMoEError, match=r"no training items for head\(s\) asr in .*it has: emotion.*--set tasks.asr=null"
    ):
        build_data(model, str(manifest(tmp_path, lines)), None, batch_size=2, seed=0, eval_batches=0)
    fed = compose("tiny-multitask", ["tasks.tags=null", "tasks.llm=null", "tasks.asr=null"])
    build_data(fed, str(manifest(tmp_path, lines)), None, batch_size=2, seed=0, eval_batches=1)  # the fix works


def test_bad_targets_are_named_by_file_and_line_before_training(tmp_path):
    """An empty transcript and a label typo fail up front with their lines, not when first sampled mid-run."""
    from audiomoe.core.composer import compose
    from audiomoe.train.data import build_data

    wav(tmp_path / "wav" / "a.wav")
    lines = [
        {"audio": "wav/a.wav", "task": "emotion", "target": 1, "split": "train"},
        {"audio": "wav/a.wav", "task": "asr", "target": "hello", "split": "train"},
        {"audio": "wav/a.wav", "task": "asr", "target": "", "split": "train"},
        {"audio": "wav/a.wav", "task": "emotion", "target": 99, "split": "test"},
    ]
    p = manifest(tmp_path, lines)
    model = compose("tiny-multitask", ["tasks.tags=null", "tasks.llm=null"])
    with pytest.raises(
        AudioMoEError,
        match=r"2 item\(s\) with a target their head cannot use: .*m.jsonl:3: empty transcript.*m.jsonl:4: label 99 is outside",
    ):
        build_data(model, str(p), None, batch_size=2, seed=0, eval_batches=1)


def test_csv_with_an_empty_cell_is_refused_before_writing_and_transcripts_get_no_label_head(wavs, tmp_path, capsys):
    from audiomoe.cli import main

    (wavs / "wav" / "asr.csv").write_text("file,text,split\n0.wav,hello,train\n1.wav, ,train\n")
    out = tmp_path / "asr.jsonl"
    with pytest.raises(AudioMoEError, match=r"asr.csv:3: empty 'text' cell"):
        manifest_from_csv(wavs / "wav" / "asr.csv", out, task="asr", target_column="text")
    assert not out.exists()
    rows = "".join(f"{i % 4}.wav,utterance number {i},{'train' if i < 10 else 'test'}\n" for i in range(12))
    (wavs / "wav" / "asr.csv").write_text("file,text,split\n" + rows)
    assert (
        main(["data", "from-csv", str(wavs / "wav" / "asr.csv"), str(out), "--task", "asr", "--target-column", "text"])
        == 0
    )
    text = capsys.readouterr().out
    assert "look like transcripts (12 distinct of 12)" in text and "tasks.asr=classification" not in text
    assert "only outside the train split" in text


def test_a_corrupt_file_found_by_a_loader_worker_is_one_line_naming_its_line(wavs):
    (wavs / "wav" / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    p = manifest(
        wavs, [good(0), {"audio": "wav/bad.wav", "task": "cls", "target": "a", "duration": 0.5}]
    )  # a duration: no header read up front
    loader = build_loader({"sources": {"m": {"path": str(p)}}, "num_workers": 1, "max_items": 1})
    with pytest.raises(AudioMoEError) as err:
        list(loader)
    (line,) = str(err.value).splitlines()
    assert "m.jsonl:2: cannot decode" in line and "bad.wav" in line and "Traceback" not in line


def test_an_empty_split_names_the_splits_there_and_an_offset_past_the_end_says_so(wavs):
    p = manifest(wavs, [{**good(0), "split": "train"}, good(1)])
    with pytest.raises(
        AudioMoEError, match=r"no usable items with split 'validation'.*its lines' splits: 'train' \(2\)"
    ):  # unsplit = train
        read_manifest(p, split="validation")
    late = manifest(wavs, [{**good(0), "offset": 4.0}], name="late.jsonl")
    with pytest.raises(AudioMoEError, match=r"late.jsonl:1: offset 4.0 s is past the end of .*0.wav' \(0.500 s long\)"):
        read_manifest(late)


def test_a_line_without_a_split_is_a_training_line(wavs):
    """`split` is optional: unsplit lines train, `test` lines are held out (the README's manifest format)."""
    p = manifest(wavs, [good(0), {**good(1), "split": "test"}, {**good(2), "split": "train"}])
    assert [i.audio.rsplit("/", 1)[-1] for i in read_manifest(p, split="train")[0]] == ["0.wav", "2.wav"]
    assert [i.split for i in read_manifest(p)[0]] == ["train", "test", "train"]
    assert len(read_manifest(p, split="test")[0]) == 1
