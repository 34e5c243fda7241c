"""Routing maths: hand-computed selector examples, property tests, losses, schedules, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from audiomoe.core.errors import AudioMoEError
from audiomoe.routers import functional as F
from audiomoe.routers.selectors.dense import Dense
from audiomoe.routers.selectors.top_k import TopK
from audiomoe.routers.selectors.top_p import TopP

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def top_p(num_experts: int = 4, **params) -> TopP:
    return TopP(TopP.Params(**params), num_experts=num_experts)


def top_k(num_experts: int = 4, **params) -> TopK:
    return TopK(TopK.Params(**params), num_experts=num_experts)


# -- hand-computed examples -------------------------------------------------------------------


def test_top_k_hand_example_renormalised_and_raw():
    s = top_k(k=2)(LOGITS)
    assert s.mask.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(s.weights, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    s = top_k(k=2, normalize=False)(LOGITS)
    torch.testing.assert_close(s.weights, torch.tensor([[0.5, 0.3, 0.0, 0.0]]))


def test_dense_hand_example():
    s = Dense(Dense.Params())(LOGITS)
    assert s.mask.all()
    torch.testing.assert_close(s.weights, PROBS)


def test_top_p_hand_example_counts_and_weights():
    # cumsum [0.5, 0.8, 0.95, 1.0]: p=0.7 -> 1 + #(c < 0.7) = 2 columns; p=0.9 -> 3; p=0.3 -> 1.
    for p, k in [(0.7, 2), (0.9, 3), (0.3, 1)]:
        s = top_p(p=p)(LOGITS)
        assert int(s.mask.sum()) == k, p
    s = top_p(p=0.7)(LOGITS)
    torch.testing.assert_close(s.weights, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    s = top_p(p=0.7, weights="raw")(LOGITS)
    torch.testing.assert_close(s.weights, torch.tensor([[0.5, 0.3, 0.0, 0.0]]))


def test_top_p_unimoe_rule_vs_strict_huang_rule_at_exact_boundary():
    # Uniform over 4 columns: cumsum is exactly [0.25, 0.5, 0.75, 1.0] in binary floating point.
    zeros = torch.zeros(1, 4)
    assert int(top_p(p=0.5)(zeros).mask.sum()) == 2  # UniMoE: 1 + #(c < 0.5) = 2
    assert int(top_p(p=0.5, strict=True)(zeros).mask.sum()) == 3  # Huang: keep through first c > 0.5


def test_top_p_min_and_max_experts():
    assert int(top_p(p=0.99, max_experts=2)(LOGITS).mask.sum()) == 2
    assert int(top_p(p=0.1, min_experts=3)(LOGITS).mask.sum()) == 3
    assert top_p(p=0.1, min_experts=3)(LOGITS).mask[0, :3].all()


def test_top_p_unimoe_code_weights_clear_winners_are_uniform():
    # logits [2, 1, 0.9, -5]: P ~ [.588, .216, .196, .0005], p=0.9 keeps 3; no near-ties -> 1/3 each.
    s = top_p(p=0.9, weights="unimoe_code")(torch.tensor([[2.0, 1.0, 0.9, -5.0]]))
    torch.testing.assert_close(s.weights, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]), atol=1e-5, rtol=0)


def test_top_p_unimoe_code_weights_near_tie_shares_the_multiplier():
    # 1.0 and 0.995 are within 2*eps relative: the first pick's multiplier is softmax over both,
    # m0 = 1 / (1 + e^-0.005); the second pick is then alone (m1 = 1). w = m / (m0 + m1 + 1e-6).
    s = top_p(p=0.7, weights="unimoe_code")(torch.tensor([[1.0, 0.995, -3.0, -3.0]]))
    m0 = 1 / (1 + math.exp(-0.005))
    expect = torch.tensor([[m0, 1.0, 0.0, 0.0]]) / (m0 + 1.0 + 1e-6)
    torch.testing.assert_close(s.weights, expect, atol=1e-6, rtol=0)


# -- properties -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(e=st.integers(1, 64), p=st.floats(0.01, 1.0))
def test_uniform_logits_top_p_keeps_ceil_p_times_e(e, p):
    # Away from exact multiples (p*E integer) the float cumsum cannot flip the count.
    assume(abs(p * e - round(p * e)) > 1e-3)
    s = top_p(num_experts=e, p=p)(torch.zeros(3, e))
    assert (s.mask.sum(-1) == math.ceil(p * e)).all()


distinct_logits = st.integers(2, 16).flatmap(
    lambda e: st.lists(st.integers(-50, 50), min_size=e, max_size=e, unique=True).map(
        lambda v: torch.tensor([v], dtype=torch.float32) / 10
    )
)


@settings(max_examples=150, deadline=None)
@given(
    logits=distinct_logits,
    p=st.floats(0.01, 1.0),
    strict=st.booleans(),
    weights=st.sampled_from(["renorm", "raw", "unimoe_code"]),
    cap=st.integers(1, 16),
)
def test_top_p_invariants(logits, p, strict, weights, cap):
    e = logits.shape[-1]
    cap = min(cap, e)
    s = top_p(num_experts=e, p=p, strict=strict, weights=weights, max_experts=cap)(logits)
    assert s.mask[0, int(logits.argmax())]  # the first choice is always kept
    assert 1 <= int(s.mask.sum()) <= cap  # never more than the max
    assert (s.weights[~s.mask] == 0).all()
    if weights != "raw":
        torch.testing.assert_close(s.weights.sum(-1), torch.ones(1), atol=1e-5, rtol=0)
    # kept columns are a prefix of the descending order
    kept = s.mask[0][logits[0].argsort(descending=True)]
    assert not (~kept[:-1] & kept[1:]).any()


@settings(max_examples=150, deadline=None)
@given(logits=distinct_logits, k=st.integers(1, 16))
def test_top_p_near_one_with_cap_k_equals_top_k(logits, k):
    e = logits.shape[-1]
    k = min(k, e)
    a = top_p(num_experts=e, p=1.0, max_experts=k)(logits)
    # k=1: top-k weights by P (the router must learn); the straight-through value equals renorm's 1
    b = top_k(num_experts=e, k=k, top1="straight_through")(logits)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weights, b.weights)


@settings(max_examples=100, deadline=None)
@given(logits=distinct_logits, k=st.integers(1, 16))
def test_top_k_and_dense_weights_sum_to_one(logits, k):
    e = logits.shape[-1]
    s = top_k(num_experts=e, k=min(k, e))(logits)
    if min(k, e) > 1:
        torch.testing.assert_close(s.weights.sum(-1), torch.ones(1))
    else:  # k=1: the raw probability (Switch), never the gradient-free constant P/P
        torch.testing.assert_close(s.weights.sum(-1), logits.softmax(-1).max(-1).values)
        st_sel = top_k(num_experts=e, k=1, top1="straight_through")(logits)
        torch.testing.assert_close(st_sel.weights.sum(-1), torch.ones(1))
    assert int(s.mask.sum()) == min(k, e)
    torch.testing.assert_close(Dense(Dense.Params())(logits).weights.sum(-1), torch.ones(1))


# -- losses -----------------------------------------------------------------------------------


def test_unimoe_aux_loss_hand_example_and_padding_excluded():
    logits = torch.zeros(2, 2)
    mask = torch.tensor([[True, False], [True, True]])
    # P~ = [[1, 0], [.5, .5]]; f = [1, .5]; P = [.75, .25]; E * sum f P = 2 * (.75 + .125)
    assert F.unimoe_aux_loss(logits, mask).item() == pytest.approx(1.75)
    # item 1 padded: f = [1, 0], P = [1, 0] -> 2
    assert F.unimoe_aux_loss(logits, mask, torch.tensor([True, False])).item() == pytest.approx(2.0)


def test_switch_z_and_entropy_losses_hand_examples():
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    mask = torch.tensor([[True, False], [False, True]])
    # f = [.5, .5], P = [.5, .5] -> 2 * .5 = 1 (perfect balance)
    assert F.switch_balance_loss(probs, mask).item() == pytest.approx(1.0)
    # only item 0 valid: f = [1, 0], P = [.75, .25] -> 1.5
    assert F.switch_balance_loss(probs, mask, torch.tensor([True, False])).item() == pytest.approx(1.5)
    zeros = torch.zeros(3, 4)
    assert F.z_loss(zeros).item() == pytest.approx(math.log(4) ** 2)
    big = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0, 0, 0]])
    assert F.z_loss(big, torch.tensor([True, False])).item() == pytest.approx(math.log(4) ** 2)
    assert F.entropy_loss(zeros.softmax(-1)).item() == pytest.approx(math.log(4))


def test_scheduled_weight_linear_and_cosine():
    w = lambda s, kind="linear": F.scheduled_weight(0.025, 0.001, 10000, torch.tensor(s), kind).item()
    assert w(0) == pytest.approx(0.025)
    assert w(5000) == pytest.approx(0.013)
    assert w(10000) == pytest.approx(0.001)
    assert w(50000) == pytest.approx(0.001)
    assert w(5000, "cosine") == pytest.approx(0.013)
    assert w(2500, "cosine") > w(2500)  # cosine decays slower at first
    assert F.scheduled_weight(0.5, None, 10, torch.tensor(7)).item() == pytest.approx(0.5)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
def test_p_outside_unit_interval_is_an_error_naming_value_and_limit(p):
    with pytest.raises(AudioMoEError, match=rf"p={p}.*\(0, 1\]"):
        F.top_p_count(PROBS, p)
    with pytest.raises(Exception, match="p"):
        TopP.Params(p=p)


def test_k_larger_than_columns_is_an_error():
    with pytest.raises(AudioMoEError, match=r"k=5 .*\(4\)"):
        top_k(k=5)
    with pytest.raises(AudioMoEError, match=r"k=3 .*\(2\)"):
        F.top_k_select(torch.zeros(1, 2), 3)
    with pytest.raises(AudioMoEError, match=r"max_experts=6 .*\(4\)"):
        top_p(max_experts=6)


def test_nan_logits_are_an_error():
    bad = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(AudioMoEError, match="1 NaN"):
        F.check_logits(bad)


def test_sparse_mixer_weights_match_the_all_rows_definition_with_gradients():
    """The shrinking-rows implementation equals computing every rank on every row (masked)."""
    import math

    from audiomoe.routers.functional import sparse_mixer_weights, top_p_count

    def definition(logits, order, k, eps):
        mult = torch.zeros_like(logits)
        taken = torch.zeros_like(logits, dtype=torch.bool)
        for r in range(int(k.max())):
            sel = order[:, r : r + 1]
            with torch.no_grad():
                m = logits.detach().gather(-1, sel)
                factor = logits.detach().abs().clamp(min=m.abs()).clamp_min(1e-12)
                near = ((m - logits.detach()) / factor <= 2 * eps) & ~taken
                near.scatter_(-1, sel, True)
            gate = logits.masked_fill(~near, -math.inf).softmax(-1).gather(-1, sel)
            mult = mult + torch.zeros_like(logits).scatter(-1, sel, gate * (k > r).to(logits.dtype)[:, None])
            taken = taken.scatter(-1, sel, True)
        return mult / (mult.sum(-1, keepdim=True) + 1e-6)

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, 9, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    logits.data[:20, 1] = logits.data[:20, 0] * 0.995  # near ties
    k, order = top_p_count(logits.softmax(-1), 0.7)
    assert k.min() < k.max()
    a = sparse_mixer_weights(logits, order, k, 0.01)
    b = definition(logits, order, k, 0.01)
    torch.testing.assert_close(a, b)
    c = torch.randn(300, 9, generator=g, dtype=torch.float64)
    (ga,) = torch.autograd.grad((a * c).sum(), logits)
    (gb,) = torch.autograd.grad((b * c).sum(), logits)
    torch.testing.assert_close(ga, gb)
