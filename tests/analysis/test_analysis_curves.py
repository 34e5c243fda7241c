"""Report curves read from a run directory on disk: the training loss does not move with a batch's task mix, and the
mid-run eval curve is the mean over tasks of each eval's accuracy."""

from __future__ import annotations

import json

import pytest

from audiomoe.analysis.report_blocks import eval_curves_block
from audiomoe.analysis.results import eval_curve, training_curve


def _run(tmp_path, records, history):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({"steps": len(records), "eval_history": history}))
    return run


def test_the_training_curve_is_the_mean_of_each_tasks_latest_loss_not_the_batch_total(tmp_path):
    # every task's loss is constant (a 2.0, b 1.0); batches hold a, b or both: the batch total jumps 1 / 2 / 3
    mixes = [{"task/a": 2.0}, {"task/b": 1.0}, {"task/a": 2.0, "task/b": 1.0}, {"task/b": 1.0}, {"task/a": 2.0}]
    records = [
        {"step": i + 1, "loss": sum(m.values()), "losses": {**m, "aux/balance": 0.01}} for i, m in enumerate(mixes)
    ]
    steps, losses, source = training_curve(_run(tmp_path, records, []))
    assert steps == [1, 2, 3, 4, 5] and "mean over tasks" in source
    assert losses[0] == 2.0 and losses[1:] == pytest.approx([1.5] * 4)  # flat once both tasks were seen


def test_the_eval_curve_averages_the_tasks_of_each_eval(tmp_path):
    hist = [
        {"step": 50, "train_loss": 3.0, "a/accuracy": 0.2, "b/accuracy": 0.4, "a/macro_f1": 0.1},
        {"step": 100, "train_loss": 2.0, "a/accuracy": 0.5, "b/accuracy": 0.7},
    ]
    run = _run(tmp_path, [{"step": 1, "loss": 1.0}], hist)
    steps, values = eval_curve(run)
    assert steps == [50, 100] and values == pytest.approx([0.3, 0.6])
    blocks = eval_curves_block({"cfg": [(steps, values)]}, tmp_path / "plots")
    assert blocks[0][0] == "img" and (tmp_path / "plots" / "eval_curves.png").stat().st_size > 5000
    assert "whole held-out split" in blocks[0][2]
    assert eval_curves_block({"cfg": [([100], [0.5])]}, tmp_path / "plots")[0][0] == "p"  # one eval: no curve to draw
