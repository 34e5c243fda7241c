"""Classification head: single- and multi-label learning, pooling over valid frames only, labels, metrics."""

from __future__ import annotations

import pytest
import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.heads.classification import Classification


def _frames(centres: torch.Tensor, gen: torch.Generator, n: int = 10, d: int = 16):
    """Items whose valid frames scatter around ``centres`` [B, d]; padded frames hold large garbage."""
    b = centres.shape[0]
    x = centres[:, None, :] + 0.5 * torch.randn(b, n, d, generator=gen)
    valid = torch.randint(3, n + 1, (b,), generator=gen)
    pad = torch.arange(n)[None] >= valid[:, None]
    x = torch.where(pad[..., None], 50 * torch.randn(b, n, d, generator=gen), x)
    return x, pad


def _train(head, make_batch, steps=40, lr=0.05):
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        x, pad, raw = make_batch()
        loss = head.loss(head(x, pad), head.make_targets(raw, x.device))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_single_label_learns_above_chance(pooling):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    means = torch.randn(4, 16)
    head = Classification(Classification.Params(num_classes=4, pooling=pooling), d_model=16)

    def batch():
        y = torch.randint(0, 4, (32,), generator=gen)
        x, pad = _frames(means[y], gen)
        return x, pad, y.tolist()

    _train(head, batch)
    x, pad, y = batch()
    m = head.metrics(head.predict(head(x, pad)), head.make_targets(y, x.device))
    assert m["accuracy"] > 0.9 and m["macro_f1"] > 0.85  # chance is 0.25


def test_multi_label_learns_map_above_chance():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    vecs = torch.randn(6, 16)
    head = Classification(Classification.Params(num_classes=6, multi_label=True), d_model=16)

    def batch():
        on = torch.rand(32, 6, generator=gen) < 0.3
        x, pad = _frames(on.float() @ vecs, gen)
        return x, pad, [row.nonzero().flatten().tolist() for row in on]

    x0, pad0, y0 = batch()
    before = head.metrics(head.predict(head(x0, pad0)), head.make_targets(y0, x0.device))["mAP"]
    _train(head, batch, steps=60)
    after = head.metrics(head.predict(head(x0, pad0)), head.make_targets(y0, x0.device))
    assert after["mAP"] > 0.9 > before + 0.2
    assert after["macro_f1"] > 0.7
    probs = head.predict(head(x0, pad0))
    assert probs.shape == (32, 6) and ((probs >= 0) & (probs <= 1)).all()


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_padded_frames_do_not_change_the_output(pooling):
    torch.manual_seed(0)
    head = Classification(Classification.Params(num_classes=3, pooling=pooling), d_model=8)
    x = torch.randn(2, 6, 8)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, :] = True  # an item with no valid frame pools to zeros, not NaN
    y = head(x, pad)
    x2 = x.clone()
    x2[pad] = 1e3
    assert torch.allclose(head(x2, pad), y)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[1], head.head.bias)


def test_label_names_and_multi_hot_targets():
    head = Classification(
        Classification.Params(num_classes=3, labels=["dog", "cat", "car"], multi_label=True), d_model=4
    )
    t = head.make_targets([["dog", 2], []], torch.device("cpu"))
    assert t.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert head.decode(torch.tensor([[0.9, 0.1, 0.6]])) == [["dog", "car"]]


def test_bad_labels_are_clear_errors():
    head = Classification(Classification.Params(num_classes=3), d_model=4)
    with pytest.raises(AudioMoEError, match=r"label 3 is outside the label set \[0, 3\)"):
        head.make_targets([0, 3], torch.device("cpu"))
    with pytest.raises(AudioMoEError, match="label -1 is outside"):
        head.make_targets([-1], torch.device("cpu"))
    with pytest.raises(AudioMoEError, match="'bird' is not in the label set"):
        head.make_targets(["bird"], torch.device("cpu"))
    with pytest.raises(AudioMoEError, match="must be a class index"):
        head.make_targets([1.5], torch.device("cpu"))
    multi = Classification(Classification.Params(num_classes=3, multi_label=True), d_model=4)
    with pytest.raises(AudioMoEError, match="must be a list of labels"):
        multi.make_targets([1], torch.device("cpu"))
    with pytest.raises(ValueError, match="labels has 2 names but num_classes is 3"):
        Classification.Params(num_classes=3, labels=["a", "b"])


def test_metrics_on_known_answers():
    single = Classification(Classification.Params(num_classes=3), d_model=4)
    m = single.metrics(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    multi = Classification(Classification.Params(num_classes=3, multi_label=True), d_model=4)
    probs = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.1], [0.6, 0.7, 0.1]])
    targets = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0]])
    m = multi.metrics(probs, targets)
    assert m["mAP"] == pytest.approx((1.0 + 1.0) / 2)  # class 2 has no positive: left out (AudioSet convention)
    assert m["subset_accuracy"] == pytest.approx(2 / 3)
