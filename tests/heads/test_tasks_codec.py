"""Codec-token head: exact delay pattern, per-codebook vocabularies when sampling, learning, errors, decoder hook."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Backbone, BackboneOutput
from audiomoe.core.specs import Params
from audiomoe.heads.codec import CodecGeneration
from audiomoe.heads.functional import apply_delay_pattern, revert_delay_pattern, sample_logits


@settings(max_examples=60, deadline=None)
@given(
    delays=st.lists(st.integers(0, 6), min_size=1, max_size=5),
    lengths=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_delay_pattern_round_trips_exactly(delays, lengths, seed):
    k, b, t = len(delays), len(lengths), max(lengths)
    bos, eos, pad = 100, 101, 102
    codes = torch.randint(0, 100, (b, k, t), generator=torch.Generator().manual_seed(seed))
    n = torch.tensor(lengths)
    delayed = apply_delay_pattern(codes, n, delays, bos=bos, eos=eos, pad=pad)
    assert delayed.shape == (b, k, t + max(delays) + 1)
    back = revert_delay_pattern(delayed, n, delays, pad=pad)
    for i, li in enumerate(lengths):
        assert torch.equal(back[i, :, :li], codes[i, :, :li])
        assert (back[i, :, li:] == pad).all()
        for j, d in enumerate(delays):
            row = delayed[i, j]
            assert (row[:d] == bos).all() and torch.equal(row[d : d + li], codes[i, j, :li])
            assert row[d + li] == eos and (row[d + li + 1 :] == pad).all()


def test_unimoe_delay_pattern_layout():
    delays = [0, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]  # UniMoE-Audio's 12 DAC codebooks
    codes = torch.arange(12 * 5).view(1, 12, 5)
    delayed = apply_delay_pattern(codes, torch.tensor([5]), delays, bos=1026, eos=1024, pad=1025)
    assert delayed.shape == (1, 12, 5 + 18 + 1)
    assert delayed[0, 1, 8] == codes[0, 1, 0] and delayed[0, 1, 7] == 1026 and delayed[0, 11, 23] == 1024
    assert torch.equal(revert_delay_pattern(delayed, torch.tensor([5]), delays, pad=1025), codes)


def test_frames_loss_is_the_sum_of_per_codebook_means_with_their_gradients():
    """One cross-entropy over all codebooks equals the per-codebook loop (a codebook with nothing scored skipped)."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    head = CodecGeneration(
        CodecGeneration.Params(num_codebooks=3, codebook_size=[5, 9, 7], delays=[0, 1, 2]), d_model=8
    )
    logits = torch.randn(2, 6, 3, head.vocab, requires_grad=True)
    labels = torch.randint(0, 5, (2, 6, 3))
    labels[0, :2] = -100
    labels[..., 2] = -100  # codebook 2 scores nothing
    loss = head.frames_loss(logits, SimpleNamespace(labels=labels))
    ref = sum(
        nn.functional.cross_entropy(
            logits[..., j, :].reshape(-1, head.vocab), labels[..., j].reshape(-1), ignore_index=-100
        )
        for j in (0, 1)
    )
    torch.testing.assert_close(loss, ref)
    g, g_ref = torch.autograd.grad(loss, logits, retain_graph=True)[0], torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(g, g_ref)
    assert g[..., 2, :].abs().max() == 0 and g[..., :2, :].abs().max() > 1e-3


def test_frame_embedder_equals_the_sum_of_per_codebook_embeddings():
    torch.manual_seed(0)
    head = CodecGeneration(
        CodecGeneration.Params(num_codebooks=3, codebook_size=[3, 17, 5], delays=[0, 2, 1]), d_model=16
    )
    frames = torch.stack([torch.randint(0, head.vocab, (2, 7)) for _ in range(3)], -1)  # [B, S, K], specials included
    one = head.frame_embedder()(frames)
    torch.testing.assert_close(one, head.embed_frames(frames), rtol=1e-6, atol=1e-6)
    assert one.shape == (2, 7, 16) and one.abs().max() > 0.1


def test_step_logits_equal_frame_logits_with_the_same_disallowed_ids():
    """One decoding position's logits through the pre-transposed weight and the -inf bias = frame_logits."""
    torch.manual_seed(0)
    head = CodecGeneration(
        CodecGeneration.Params(num_codebooks=3, codebook_size=[3, 17, 5], delays=[0, 2, 1]), d_model=16
    )
    nn.init.normal_(head.out.bias)
    h = torch.randn(4, 16)
    with torch.no_grad():
        fast, ref = head.step_logits()(h), head.frame_logits(h[:, None])[:, 0]
    assert fast.shape == (4, 3, head.vocab) and torch.equal(torch.isinf(fast), torch.isinf(ref))
    assert int(torch.isinf(fast[0]).sum()) == 3 * head.vocab - (3 + 17 + 5 + 1)  # each codebook's ids, + the lead's eos
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(fast[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_sampling_respects_per_codebook_vocabularies():
    torch.manual_seed(0)
    sizes = [3, 17, 5]
    head = CodecGeneration(
        CodecGeneration.Params(num_codebooks=3, codebook_size=sizes, delays=[0, 2, 1], max_frames=12, temperature=3.0),
        d_model=16,
    )
    nn.init.normal_(head.out.weight, std=5.0)  # sharp, arbitrary logits: invalid ids would win if not masked
    feats, pad = torch.randn(4, 5, 16), torch.zeros(4, 5, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for kwargs in ({}, {"top_k": 2}, {"top_p": 0.5}, {"temperature": 0.0}):
        preds = head.generate(head(feats, pad), generator=g, **kwargs)
        assert len(preds) == 4
        for codes in preds:
            assert codes.shape[0] == 3 and 1 <= codes.shape[1] <= 12
            for j, s in enumerate(sizes):
                assert ((codes[j] >= 0) & (codes[j] < s)).all(), (j, codes[j])


def test_sample_logits_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, float("-inf")]]).repeat(200, 1)
    assert (sample_logits(logits, temperature=0.0) == 2).all()
    assert (sample_logits(logits, top_k=1) == 2).all()
    s = sample_logits(logits, temperature=5.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(s.tolist()) == {1, 2}
    s = sample_logits(logits, temperature=1.0, top_p=0.5)
    assert (s == 2).all()  # 5.0 holds ~98% of the mass


def test_codec_head_learns_class_conditional_codes():
    torch.manual_seed(0)
    head = CodecGeneration(
        CodecGeneration.Params(num_codebooks=2, codebook_size=16, delays=[0, 1], temperature=0.0, max_frames=8),
        d_model=32,
    )
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(2, 32) * 2
    songs = [torch.randint(0, 16, (2, 4), generator=gen), torch.randint(0, 16, (2, 6), generator=gen)]
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)

    def batch():
        y = torch.randint(0, 2, (8,), generator=gen)
        x = means[y][:, None, :] + 0.3 * torch.randn(8, 5, 32, generator=gen)
        return x, torch.zeros(8, 5, dtype=torch.bool), [songs[int(i)] for i in y]

    x, pad, raw = batch()
    first = head.loss(head(x, pad), head.make_targets(raw, x.device)).item()
    for _ in range(80):
        x, pad, raw = batch()
        loss = head.loss(head(x, pad), head.make_targets(raw, x.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    x, pad, raw = batch()
    m = head.metrics(head.predict(head(x, pad)), head.make_targets(raw, x.device))
    assert loss.item() < first / 4
    assert m["code_accuracy"] > 0.8 and m["length_error"] < 0.5  # chance accuracy is 1/16


def test_bad_codec_targets_are_clear_errors():
    head = CodecGeneration(CodecGeneration.Params(num_codebooks=2, codebook_size=[4, 8]), d_model=8)
    cpu = torch.device("cpu")
    with pytest.raises(AudioMoEError, match=r"code 5 in codebook 0 is outside its vocabulary \[0, 4\)"):
        head.make_targets([[[5, 1], [1, 1]]], cpu)
    with pytest.raises(AudioMoEError, match=r"must be \[num_codebooks=2, frames\]"):
        head.make_targets([[[1, 1]]], cpu)
    with pytest.raises(AudioMoEError, match="empty"):
        head.make_targets([torch.zeros(2, 0, dtype=torch.long)], cpu)
    with pytest.raises(ValueError, match="delays has 1 entries but num_codebooks is 2"):
        CodecGeneration.Params(num_codebooks=2, delays=[0])


class _CausalMLPBackbone(Backbone):
    """A real causal 'decoder' for the hook test: prefix mean (causal) + MLP, with an aux loss."""

    class Params(Params):
        pass

    def __init__(self, params, *, d_model):
        super().__init__(params)
        self.mlp = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.GELU())

    def forward(self, x, padding_mask, causal=False):
        keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
        ctx = (x * keep).cumsum(1) / keep.cumsum(1).clamp_min(1.0)
        h = self.mlp(torch.cat([x, ctx], -1))
        return BackboneOutput(h, aux_losses={"balance": h.pow(2).mean() * 0.0 + 0.25})


class _NonCausalBackbone(_CausalMLPBackbone):
    """Same without the causal argument."""

    def forward(self, x, padding_mask):
        return super().forward(x, padding_mask)


def test_decoder_hook_uses_a_causal_backbone_and_adds_its_aux_losses():
    torch.manual_seed(0)
    p = CodecGeneration.Params(num_codebooks=2, codebook_size=8)
    head = CodecGeneration(
        p, d_model=8, decoder=lambda d_model: _CausalMLPBackbone(_CausalMLPBackbone.Params(), d_model=d_model)
    )
    torch.manual_seed(0)
    x, pad = torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.bool)
    targets = head.make_targets(head.example_targets(2), torch.device("cpu"))
    loss = head.loss(head(x, pad), targets)
    logits, aux, _ = head._decode(head(x, pad), targets.inputs, targets.padding_mask)
    assert set(aux) == {"balance"}
    assert loss.item() == pytest.approx(
        sum(
            nn.functional.cross_entropy(
                logits[..., j, :].reshape(-1, head.vocab), targets.labels[..., j].reshape(-1)
            ).item()
            for j in range(2)
        )
        + 0.25,
        rel=1e-5,
    )
    with pytest.raises(AudioMoEError, match="cannot run causally"):
        CodecGeneration(
            p, d_model=8, decoder=lambda d_model: _NonCausalBackbone(_NonCausalBackbone.Params(), d_model=d_model)
        )
