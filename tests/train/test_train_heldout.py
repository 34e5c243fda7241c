"""Whole-split held-out scoring (audiomoe.train.heldout): per-item outcomes, Wilson intervals, chance, item caps.

The scores are checked against a direct forward pass over the same items and against Wilson's formula
computed by hand, so a wrong pairing of predictions with targets, a dropped item or a mean of batch
means (instead of items) fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

import audiomoe
from audiomoe.data import make_corpus
from audiomoe.data.loader import ItemDataset, collate
from audiomoe.data.manifest import read_manifest
from audiomoe.train.heldout import flat_metrics, pick_items, score_model, summary_table, wilson_interval


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, "tiny", 0, progress=False)
    return root / "manifest.jsonl"


def test_wilson_interval_by_hand():
    # 40 of 50: p = 0.8, z = 1.96: centre (0.8 + z^2/100) / (1 + z^2/50), half z sqrt(0.8*0.2/50 + z^2/10000) / (1 + z^2/50)
    z = 1.959963984540054
    den = 1 + z * z / 50
    centre, half = (0.8 + z * z / 100) / den, z * math.sqrt(0.16 / 50 + z * z / 10000) / den
    lo, hi = wilson_interval(40, 50)
    assert lo == pytest.approx(centre - half) and hi == pytest.approx(centre + half)
    assert lo == pytest.approx(0.6696, abs=1e-4) and hi == pytest.approx(0.8876, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)  # never outside [0, 1]
    assert 0.0 <= wilson_interval(1, 3)[0] and wilson_interval(2, 3)[1] <= 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_every_item_is_scored_once_and_matches_a_direct_forward_pass(corpus):
    model = audiomoe.compose("tiny-corpus").eval()
    items = []
    for task in model.task_names:
        its, _ = read_manifest(corpus, split="test", only_tasks=[task])
        items += its
    scores = score_model(model, items, batch_size=5)  # 5 does not divide the counts: batches split tasks
    for task in model.task_names:
        mine = [it for it in items if it.task == task]
        res = scores["tasks"][task]
        assert res["items"] == len(mine) == len(res["per_item"]) == len(res["item_ids"])
        ds = ItemDataset(mine, 16000, max_clip_seconds=30.0)
        with torch.no_grad():
            batch, _ = collate([(ds.load(i, 0), it) for i, it in enumerate(mine)], 16000)
            out = model(audiomoe.AudioBatch(batch.waveforms, 16000, batch.tasks, batch.lengths))
        want = (
            (out.predictions[task] == model.heads[task].make_targets(batch.targets, torch.device("cpu")))
            .long()
            .tolist()
        )
        assert res["per_item"] == want  # item by item, in manifest order
        assert res["metrics"]["accuracy"] == pytest.approx(sum(want) / len(want))
        lo, hi = res["interval"]["accuracy"]
        assert 0.0 <= lo <= res["metrics"]["accuracy"] <= hi <= 1.0
        labels = [model.heads[task].make_targets([it.target], torch.device("cpu")).item() for it in mine]
        majority = max(labels.count(c) for c in set(labels)) / len(labels)
        assert res["chance"]["accuracy"] == pytest.approx(max(majority, 1 / model.heads[task].params.num_classes))
    flat = flat_metrics(scores)
    accs = [scores["tasks"][t]["metrics"]["accuracy"] for t in model.task_names]
    assert flat["mean/accuracy"] == pytest.approx(sum(accs) / len(accs)) and flat["worst/accuracy"] == min(accs)
    table = summary_table(scores)
    assert table.splitlines()[0].split()[:3] == ["task", "items", "accuracy"] and all(
        t in table for t in model.task_names
    )


def test_the_cap_takes_the_same_first_items_of_every_task(corpus):
    items, _ = read_manifest(corpus, split="test")
    picked = pick_items(items, 3)
    tasks = {it.task for it in items}
    assert len(picked) == sum(min(3, sum(1 for it in items if it.task == t)) for t in tasks)
    for t in tasks:
        assert [it for it in picked if it.task == t] == [it for it in items if it.task == t][:3]


def test_train_ends_with_the_whole_split_scored_and_a_summary_table(corpus, tmp_path, capsys):
    import json

    from audiomoe import cli

    out = tmp_path / "run"
    argv = [
        "train",
        "tiny-corpus",
        "--data",
        str(corpus),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--eval-batches",
        "1",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    stored = json.loads((out / "heldout.json").read_text())
    lines = [json.loads(x) for x in corpus.read_text().splitlines()]
    for task in ("language", "speaker", "style", "event"):
        n = sum(1 for x in lines if x["task"] == task and x["split"] == "test")
        assert summary["heldout"]["tasks"][task]["items"] == n == len(stored["tasks"][task]["per_item"])
        acc = summary["heldout"]["metrics"][f"{task}/accuracy"]
        assert acc == pytest.approx(sum(stored["tasks"][task]["per_item"]) / n)
        row = next(line for line in printed.splitlines() if line.startswith(task + " "))
        assert row.split()[1] == str(n) and f"{acc:.3f}" in row  # the table, not a JSON dump
    assert printed.startswith("trained 2 steps") and "95% interval" in printed and "chance" in printed
    assert "per_item" not in summary["heldout"]["tasks"]["event"]  # per-item outcomes live in heldout.json only
    assert cli.main(argv[:-2] + ["--set", "eval.final=false", "--quiet", "--out", str(tmp_path / "off")]) == 0
    assert "heldout" not in json.loads((tmp_path / "off" / "summary.json").read_text())
