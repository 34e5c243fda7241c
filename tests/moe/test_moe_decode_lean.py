"""Issue 28, a decoding step's MoE layer without per-step extras: each mechanism equals the path it replaced.

- ``GroupedSwiGLU.forward_picked``: one token reads its picks and weights on the host once; a few tokens run
  their (expert, token) pairs in expert order once. Both equal the former per-expert gather / scatter exactly.
- ``LazyRouting``: a no-grad record computes ``indices``, ``counts`` and ``applied`` only when read, equal to
  the eager record's values; a decoding step computes none of them.
- ``check_logits``: one reduction read on the host; non-finite logits raise as before, huge finite ones pass.
- upcycled LMs find their MoE MLPs once (no module walk per call); a deep copy keeps its own.
"""

from __future__ import annotations

import copy

import pytest
import torch

from audiomoe import component_builder
from audiomoe.core.errors import AudioMoEError
from audiomoe.moe.grouped import GroupedSwiGLU
from audiomoe.routers.functional import LazyRouting, check_logits, picked_indices


def old_forward_picked(ex: GroupedSwiGLU, x, picked, w):
    """The former ``picked`` path: per picked expert, gather its rows, run it, scatter-add its weighted output."""
    out = x.new_zeros(x.shape)
    for e in picked.any(0).nonzero().flatten().tolist():
        rows = picked[:, e].nonzero().flatten()
        out.index_add_(0, rows, ex.expert_forward(e, x.index_select(0, rows)) * w.index_select(0, rows)[:, e : e + 1])
    return out


@pytest.mark.parametrize("n", [1, 2, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_picked_equals_the_per_expert_path_exactly(n, dtype):
    torch.manual_seed(n)
    ex = GroupedSwiGLU(8, 32, 48).to(dtype)
    x = torch.randn(n, 32, dtype=dtype)
    logits = torch.randn(n, 8)
    picked = torch.zeros(n, 8, dtype=torch.bool).scatter(1, logits.topk(2).indices, True)
    if n == 4:
        picked[2] = False  # a row with no routed pick (a null pick, or a padded token)
    w = (logits.softmax(-1) * picked).to(dtype)
    with torch.no_grad():
        got = ex.forward_picked(x, picked, w)
        ref = old_forward_picked(ex, x, picked, w)
    assert float(ref.abs().max()) > 1e-3
    assert torch.equal(got, ref)
    # with autograd the weights keep their gradient (no Python float): gradients equal the former path's
    wg, wr = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ex.forward_picked(x, picked, wg).square().sum().backward()
    old_forward_picked(ex, x, picked, wr).square().sum().backward()
    assert float(wr.grad.abs().max()) > 1e-4
    torch.testing.assert_close(wg.grad, wr.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [{}, {"num_null": 1, "num_shared": 2, "shared_d_ff": 16}])
def test_lazy_record_fields_equal_the_eager_ones_and_are_not_computed_by_a_step(kw):
    torch.manual_seed(0)
    spec = {"num_experts": 6, "router": {"name": "top_p" if kw else "top_k"}, **kw}
    layer = component_builder("moe", {"name": "moe", "params": spec})(d_model=16).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, :2] = True
    _, eager = layer(x, pad)
    with torch.no_grad():
        _, lazy = layer(x, pad)
    assert isinstance(lazy, LazyRouting) and not isinstance(eager, LazyRouting)
    assert all(lazy.__dict__.get(f"_{f}") is None for f in ("indices", "counts", "applied"))  # nothing computed yet
    assert torch.equal(lazy.counts, eager.counts) and int(lazy.counts.sum()) > 0
    assert torch.equal(lazy.indices, eager.indices)
    torch.testing.assert_close(lazy.applied, eager.applied, rtol=0, atol=1e-12)
    assert float(lazy.applied.abs().sum()) > 0.1
    lazy.counts = torch.zeros(7)  # a value set wins over the computed one
    assert torch.equal(lazy.counts, torch.zeros(7))
    assert torch.equal(picked_indices(lazy.mask, lazy.weights), lazy.indices)


def test_check_logits_reads_one_reduction_and_still_names_non_finite_values():
    check_logits(torch.full((2, 4), 3e38))  # finite, but the sum overflows: checked element-wise, passes
    bad = torch.randn(3, 4)
    bad[0, 1], bad[2, 3], bad[1, 0] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(AudioMoEError, match="1 NaN and 2 inf"):
        check_logits(bad)
    with pytest.raises(AudioMoEError, match="columns"):
        check_logits(torch.zeros(2, 3), 4)


def test_upcycled_mlps_are_found_once_and_a_deep_copy_keeps_its_own():
    import transformers

    from audiomoe.backbones.upcycle import UpcycledMLP, _install_mask_hook, upcycle_causal_lm, upcycled_mlps

    cfg = transformers.Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1,
    )  # fmt: skip
    torch.manual_seed(0)
    lm = upcycle_causal_lm(transformers.Qwen2ForCausalLM(cfg).eval(), {"num_experts": 2}, layers=[0, 2])
    assert len(upcycled_mlps(lm)) == 2
    kept = lm.model.layers[2].mlp
    lm.model.layers[2].mlp = UpcycledMLP(copy.deepcopy(kept.moe))  # MLPs replaced, as upcycling does: found again
    _install_mask_hook(lm)
    found = upcycled_mlps(lm)
    assert found[1] is lm.model.layers[2].mlp and found[1] is not kept
    assert found == tuple(m for m in lm.modules() if isinstance(m, UpcycledMLP)) and len(found) == 2
    twin = copy.deepcopy(lm)
    assert all(a is not b for a, b in zip(upcycled_mlps(twin), found))
    assert upcycled_mlps(twin) == tuple(m for m in twin.modules() if isinstance(m, UpcycledMLP))
    ids = torch.randint(1, 64, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with torch.no_grad():
        y = twin(input_ids=ids, attention_mask=mask).logits
        assert all(m.attention_mask is None for m in upcycled_mlps(twin))  # handed over for the call only
        torch.testing.assert_close(y, lm(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
