"""Top-k's dense warm-up (``dense_steps``): every column weighted by P while training within the warm-up, then top-k."""

from __future__ import annotations

import torch

import audiomoe
from audiomoe.routers.selectors.top_k import TopK


def test_dense_warmup_routes_every_column_then_top_k_and_eval_is_always_top_k():
    sel = TopK(TopK.Params(k=1, top1="raw", dense_steps=2), num_experts=3)
    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 0.5]])
    probs = torch.softmax(logits, -1)
    sel.train()
    for _ in range(2):
        s = sel(logits)
        assert s.mask.all() and torch.allclose(s.weights, probs) and torch.allclose(s.weights.sum(-1), torch.ones(2))
        sel.advance_schedule()
    s = sel(logits)
    assert s.mask.sum(-1).tolist() == [1, 1] and s.mask[0, 1] and s.mask[1, 0]
    assert torch.allclose(s.weights[s.mask], probs[s.mask])
    fresh = TopK(TopK.Params(k=1, top1="raw", dense_steps=2), num_experts=3).eval()
    assert fresh(logits).mask.sum().item() == 2  # eval never warms up
    assert int(sel.state_dict()["step"]) == 2  # a resumed run continues where the warm-up was
    assert TopK(TopK.Params(k=1), num_experts=3).state_dict() == {}  # default top-k: no new state


def test_during_the_warm_up_every_weak_encoders_logit_gets_a_task_gradient():
    """Zero-initialised top-1 picks column 0 for everyone: the other columns' logits then get one and the same gradient
    (through the softmax's normalisation only), which says nothing about which encoder is better; during the dense
    warm-up each column's gradient carries its own encoder's effect on the loss, so they differ."""
    grads = {}
    for steps in (0, 5):
        model = audiomoe.compose(
            "mowe-tiny",
            overrides=[
                "encoder.fusion.router.scorer=data_independent",
                f"encoder.fusion.router.selector.dense_steps={steps}",
            ],
        )
        model.train()
        wav = torch.randn(4, 16000, generator=torch.Generator().manual_seed(0))
        task = next(t for t in model.task_names if hasattr(model.heads[t].params, "num_classes"))
        batch = audiomoe.AudioBatch(waveforms=wav, sample_rate=16000, tasks=task, targets=[0, 1, 0, 1])
        model(batch).loss.backward()
        g = model.encoder.fusion.router.scorer.table.grad
        grads[steps] = g.abs().sum(0)
    rest = grads[0][1:]
    assert torch.allclose(rest, rest[:1].expand_as(rest), rtol=1e-5), grads[0]  # no information between columns
    assert (grads[5] > 1e-4).all(), grads[5]  # every column learns during the warm-up ...
    assert (grads[5].max() - grads[5].min()) > 0.2 * grads[5].max(), grads[5]  # ... each by its own worth
