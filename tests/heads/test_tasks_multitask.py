"""Multi-task routing: each item reaches its own head, per-task loss weights, clear errors."""

from __future__ import annotations

import pytest
import torch

import audiomoe
from audiomoe.core.batch import AudioBatch
from audiomoe.core.errors import AudioMoEError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _batch():
    torch.manual_seed(0)
    wav = torch.randn(5, 4000) * 0.1
    tasks = ["emotion", "asr", "tags", "emotion", "llm"]
    targets = [1, "hello", [0, 3], 2, "a dog"]
    return AudioBatch(wav, 16000, tasks, torch.tensor([4000, 3900, 3000, 2000, 4000]), targets)


def test_items_reach_their_heads_and_losses_are_weighted():
    model = audiomoe.compose("tiny-multitask")
    batch = _batch()
    out = model(batch, predict=False)
    assert out.indices["emotion"].tolist() == [0, 3] and out.indices["llm"].tolist() == [4]
    assert set(out.predictions) == {"emotion", "asr", "tags"}  # generation skipped with predict=False
    assert out.predictions["asr"][0] == out.predictions["asr"][0].strip()
    weights = {"emotion": 1.0, "tags": 0.5, "asr": 0.5, "llm": 1.0}
    expected = sum(weights[t] * out.losses[f"task/{t}"] for t in weights)
    assert torch.allclose(out.loss, expected)
    # the same items through each head alone give the same per-task loss
    hidden, pad, _, _ = model.encode(batch.waveforms, batch.lengths, batch.sample_rate)
    head = model.heads["tags"]
    alone = head.loss(head(hidden[2:3], pad[2:3]), head.make_targets([[0, 3]], model.device))
    assert torch.allclose(alone, out.losses["task/tags"])
    out.loss.backward()


def test_loss_weight_override_changes_the_total():
    batch = _batch()
    base = audiomoe.compose("tiny-multitask")(batch, predict=False)
    zero = audiomoe.compose("tiny-multitask", overrides=["tasks.asr.loss_weight=0"])(batch, predict=False)
    assert torch.allclose(zero.loss, base.loss - 0.5 * base.losses["task/asr"])


def test_bad_batches_are_clear_errors():
    model = audiomoe.compose("tiny-multitask")
    batch = _batch()
    batch.tasks = ["emotion", "asr", "music", "emotion", "llm"]
    with pytest.raises(AudioMoEError, match=r"task\(s\) \['music'\] but the model has heads only for"):
        model(batch)
    batch = _batch()
    batch.targets = [7, "hello", [0, 3], 2, "a dog"]
    with pytest.raises(AudioMoEError, match=r"label 7 is outside the label set \[0, 4\)"):
        model(batch, predict=False)
    batch = _batch()
    batch.targets = [1, "", [0, 3], 2, "a dog"]
    with pytest.raises(AudioMoEError, match="empty transcript"):
        model(batch, predict=False)
