"""`audiomoe eval CHECKPOINT --data ...`: corpus-level metrics per task and per dataset, a table and JSON."""

from __future__ import annotations

import json

import pytest
import torch

import audiomoe
from audiomoe import cli
from audiomoe.data import make_corpus
from audiomoe.data.loader import ItemDataset, collate
from audiomoe.data.manifest import read_manifest
from audiomoe.train import evaluate_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, "tiny", 0, progress=False)
    return root / "manifest.jsonl"


def test_eval_prints_a_table_per_task_and_writes_json(corpus, tmp_path, capsys):
    model = audiomoe.compose("tiny-corpus")
    save_checkpoint(model, tmp_path / "run", 3)
    report_path = tmp_path / "eval.json"
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(corpus), "--json", str(report_path)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "items", "accuracy", "macro_f1", "accuracy", "95%", "interval", "chance"]
    report = json.loads(report_path.read_text())
    lines = [json.loads(x) for x in corpus.read_text().splitlines()]
    for task in model.task_names:
        n = sum(1 for x in lines if x["task"] == task and x["split"] == "test")
        assert report["items"][task] == n and f"\n{task} " in "\n" + text
    assert report["datasets"] == {}  # one dataset per task in the corpus: no per-dataset table
    # the accuracy is over all items at once, as a direct computation gives it
    items, _ = read_manifest(corpus, split="test", only_tasks=["language"])
    ds = ItemDataset(items, 16000, max_clip_seconds=30.0)
    model.eval()
    with torch.no_grad():
        batch, _ = collate([(ds.load(i, 0), it) for i, it in enumerate(items)], 16000)
        out = model(audiomoe.AudioBatch(batch.waveforms, 16000, batch.tasks, batch.lengths))
    want = float(
        (out.predictions["language"] == model.heads["language"].make_targets(batch.targets, torch.device("cpu")))
        .float()
        .mean()
    )
    assert report["tasks"]["language"]["accuracy"] == pytest.approx(want, abs=1e-6)
    lo, hi = report["interval"]["language"][
        "accuracy"
    ]  # Wilson's interval around the item-level accuracy, inside [0, 1]
    assert 0.0 <= lo <= want <= hi <= 1.0 and 1 / 8 <= report["chance"]["language"]["accuracy"] < 1.0


def test_per_dataset_rows_when_the_data_has_several(corpus, tmp_path):
    lines = [json.loads(x) for x in corpus.read_text().splitlines()]
    for i, x in enumerate(lines):
        x["audio"] = str(corpus.parent / x["audio"])
        if x["task"] == "event" and i % 2:
            x["dataset"] = "other-events"
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps(x) + "\n" for x in lines))
    model = audiomoe.compose("tiny-corpus")
    save_checkpoint(model, tmp_path / "run", 1)
    report = evaluate_checkpoint(str(tmp_path / "run"), str(two))
    per = report["datasets"]["event"]
    assert (
        set(per) == {"builtin-event", "other-events"}
        and sum(d["items"] for d in per.values()) == report["items"]["event"]
    )
    assert "language" not in report["datasets"]


def test_ctc_heads_report_wer_and_cer_and_tones_work(corpus, tmp_path):
    save_checkpoint(audiomoe.compose("tiny-ctc"), tmp_path / "ctc", 1)
    report = evaluate_checkpoint(str(tmp_path / "ctc"), str(corpus))
    n = sum(1 for x in map(json.loads, corpus.read_text().splitlines()) if x["task"] == "asr" and x["split"] == "test")
    assert set(report["tasks"]["asr"]) == {"wer", "cer"} and report["items"]["asr"] == n > 0
    assert evaluate_checkpoint(str(tmp_path / "ctc"), str(corpus), max_items=1)["items"]["asr"] == 1
    save_checkpoint(audiomoe.compose("tiny-cls"), tmp_path / "cls", 1)
    tones = evaluate_checkpoint(str(tmp_path / "cls"), "tones", tone_batches=2, batch_size=8)
    assert tones["items"]["cls"] == 16 and 0.0 <= tones["tasks"]["cls"]["accuracy"] <= 1.0


def test_eval_of_a_missing_manifest_is_one_clear_line(tmp_path, capsys):
    save_checkpoint(audiomoe.compose("tiny-corpus"), tmp_path / "run", 1)
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("audiomoe eval: error: --data") and "no such manifest" in err


def test_eval_defaults_to_the_manifest_the_run_trained_on_from_any_directory(corpus, tmp_path, monkeypatch, capsys):
    """A run trained on a user's manifest (a path relative to where train ran) is evaluated on it, from anywhere."""
    lines = [json.loads(x) for x in corpus.read_text().splitlines()]
    seen: dict[str, int] = {}
    mine = []
    for x in lines:  # every train item, the first 3 test items of each task
        if x["split"] == "test":
            seen[x["task"]] = seen.get(x["task"], 0) + 1
            if seen[x["task"]] > 3:
                continue
        mine.append(x)
    (corpus.parent / "mine.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mine))
    monkeypatch.chdir(corpus.parent)
    run = tmp_path / "run"
    assert cli.main(["train", "tiny-corpus", "--data", "mine.jsonl", "--steps", "1", "--out", str(run)]) == 0
    recorded = json.loads((run / "run.json").read_text())["recipe"]["data"]
    assert recorded == str(corpus.parent / "mine.jsonl")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert cli.main(["eval", str(run)]) == 0
    report = json.loads((run / "eval-test.json").read_text())
    tasks = audiomoe.compose("tiny-corpus").task_names
    assert report["data"] == recorded and report["items"] == {t: min(3, seen[t]) for t in tasks}
    assert sum(seen[t] for t in tasks) > sum(report["items"].values())  # not the whole corpus's test split
    assert f"on {recorded} (test)" in capsys.readouterr().out


def test_resuming_a_preset_run_keeps_its_data_and_options_and_changes_only_what_is_given(corpus, tmp_path, capsys):
    """`train --resume DIR` continues on the run's own manifest, lr and batch size (not the CLI defaults)."""
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "tiny-corpus",
                "--data",
                str(corpus),
                "--lr",
                "0.001",
                "--batch-size",
                "4",
                "--steps",
                "1",
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )

    def recipe():
        return json.loads((run / "run.json").read_text())["recipe"]

    assert cli.main(["train", "--resume", str(run), "--steps", "2", "--quiet"]) == 0
    r = recipe()
    assert (r["data"], r["optim"]["lr"], r["batch_size"], r["stages"][0]["steps"]) == (str(corpus), 0.001, 4, 2)
    assert (
        cli.main(["train", "tiny-corpus", "--resume", str(run), "--steps", "3", "--set", "optim.lr=0.002", "--quiet"])
        == 0
    )
    r = recipe()
    assert (r["data"], r["optim"]["lr"], r["batch_size"], r["stages"][0]["steps"]) == (str(corpus), 0.002, 4, 3)
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--set", "backbone.num_layers=3"]) == 2
    assert "changes the model; a resumed run keeps its model" in capsys.readouterr().err
    assert cli.main(["train", "tiny-cls", "--resume", str(run)]) == 2
    assert "trained from a different spec" in capsys.readouterr().err


def test_eval_reads_a_data_spec_at_the_split_asked_and_a_manifest_of_any_extension(corpus, tmp_path, capsys):
    """--split decides what a data YAML's sources give (not the split they name), and a `.manifest` file is a manifest."""
    import shutil

    model = audiomoe.compose("tiny-corpus")
    save_checkpoint(model, tmp_path / "run", 3)
    lines = [json.loads(x) for x in corpus.read_text().splitlines()]
    tasks = model.task_names
    n_test = sum(1 for x in lines if x["split"] == "test" and x["task"] in tasks)
    n_train = sum(1 for x in lines if x["split"] == "train" and x["task"] in tasks)
    spec = tmp_path / "data.yaml"
    spec.write_text(f"sources:\n  all: {{path: {corpus}, split: train}}\n")
    for split, n in (("test", n_test), ("train", n_train)):
        assert (
            cli.main(
                [
                    "eval",
                    str(tmp_path / "run"),
                    "--data",
                    str(spec),
                    "--split",
                    split,
                    "--json",
                    str(tmp_path / f"{split}.json"),
                ]
            )
            == 0
        )
        assert sum(json.loads((tmp_path / f"{split}.json").read_text())["items"].values()) == n
    other = shutil.copy(corpus, corpus.parent / "all.manifest")
    assert cli.main(["eval", str(tmp_path / "run"), "--data", str(other), "--json", str(tmp_path / "m.json")]) == 0
    assert sum(json.loads((tmp_path / "m.json").read_text())["items"].values()) == n_test


def test_train_takes_a_data_yaml_and_a_plain_list_of_batches(corpus, tmp_path):
    """`--data data.yaml` is a data spec (paths relative to it), and `train(data=[...])` accepts a list; too few is named."""
    from audiomoe.train import TrainConfig, train

    spec = corpus.parent / "data.yaml"
    spec.write_text(f"sources:\n  all: {{path: {corpus.name}, split: train}}\nmax_clip_seconds: 2\n")
    assert (
        cli.main(
            ["train", "tiny-corpus", "--data", str(spec), "--steps", "1", "--out", str(tmp_path / "run"), "--quiet"]
        )
        == 0
    )
    model = audiomoe.compose("tiny-cls")
    sr = int(model.encoder.sample_rate)
    batches = [
        audiomoe.AudioBatch(torch.randn(2, sr // 4), sr, ["cls"] * 2, torch.tensor([sr // 4] * 2), [0, 1])
        for _ in range(2)
    ]
    assert train("tiny-cls", config=TrainConfig(steps=2, eval_batches=0, progress=False), data=batches)["steps"] == 2
    with pytest.raises(audiomoe.AudioMoEError, match="the data ran out at step 3 of 3"):
        train("tiny-cls", config=TrainConfig(steps=3, eval_batches=0, progress=False), data=batches)
