"""The main job: training on synthetic tones, progress, atomic checkpoints, reload."""

from __future__ import annotations

import pytest
import torch

import audiomoe
from audiomoe.train import TrainConfig, load_checkpoint, save_checkpoint, train
from audiomoe.train import checkpoint as train_mod


def test_training_beats_chance_and_checkpoints_reload(tmp_path):
    result = train(
        "tiny-moe-cls", [], TrainConfig(steps=40, batch_size=16, eval_every=20, out_dir=str(tmp_path), progress=False)
    )
    after = result["eval_after"]
    # emotion has 4 classes (chance 0.25), speaker 8 (chance 0.125)
    assert after["emotion/accuracy"] > 0.6 and after["speaker/accuracy"] > 0.5, result
    assert [e["step"] for e in result["eval_history"]] == [20, 40] and result["eval_history"][
        -1
    ] == after  # every eval, not just the last
    assert (tmp_path / "latest").read_text().strip() == "step-000040"
    model = load_checkpoint(tmp_path)
    batch = audiomoe.AudioBatch(torch.randn(2, 6000), 16000, ["emotion", "speaker"])
    model.eval()
    out = model(batch)
    assert set(out.predictions) == {"emotion", "speaker"}


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model = audiomoe.compose("tiny-cls")
    good = save_checkpoint(model, tmp_path, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def dies_midway(state, path):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(train_mod, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path, 20)
    assert (tmp_path / "latest").read_text().strip() == good.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000010"]
    restored = load_checkpoint(tmp_path)
    assert all(torch.equal(restored.state_dict()[k], before[k]) for k in before)


def test_training_refuses_bad_step_counts():
    with pytest.raises(audiomoe.AudioMoEError, match=r"steps \(0\)"):
        train("tiny-cls", [], TrainConfig(steps=0, progress=False))


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(audiomoe.AudioMoEError, match="not an audiomoe checkpoint"):
        load_checkpoint(tmp_path)
