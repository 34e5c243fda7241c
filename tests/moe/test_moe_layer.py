"""The MoE layer's sorted dispatch against a plain per-token reference loop (outputs and gradients).

Routing records are written by hand (top-k and top-p-like variable picks, null-only tokens, padded
tokens), so the check covers the layer alone, whatever routers exist.
"""

from __future__ import annotations

import math

import pytest
import torch

import audiomoe
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Routing
from audiomoe.moe.layer import MoELayer

D, E, NULL = 16, 5, 2


def moe(d_model: int = D, router=None, expert=None, **params) -> MoELayer:
    """An MoE layer built through the registry, as a backbone builds it."""
    spec = {"router": router or {"name": "top_k", "params": {"k": 2}}, "expert": expert or {"name": "swiglu"}, **params}
    return audiomoe.component_builder("moe", {"name": "moe", "params": spec})(d_model=d_model)


def make_layer(expert="swiglu", **kw) -> MoELayer:
    torch.manual_seed(0)
    layer = moe(expert={"name": expert, "params": {"d_ff": 8}}, num_experts=E, num_null=NULL, **kw)
    return layer.double()


def hand_routing(n: int, kind: str, item_mask=None, seed: int = 1) -> Routing:
    """A routing over E + NULL columns: top-2, or top-p-like (1..4 picks, some tokens null-only)."""
    g = torch.Generator().manual_seed(seed)
    cols = E + NULL
    logits = torch.randn(n, cols, generator=g, dtype=torch.float64)
    if kind == "topk":
        k = torch.full((n,), 2)
    else:
        k = torch.randint(1, 5, (n,), generator=g)
    order = logits.argsort(-1, descending=True)
    mask = torch.zeros(n, cols, dtype=torch.bool)
    for t in range(n):
        mask[t, order[t, : k[t]]] = True
    if kind == "topp":
        mask[0] = False
        mask[0, E:] = True  # token 0 picks only null experts
        mask[1] = False
        mask[1, E] = True
    logits.requires_grad_(True)
    probs = logits.softmax(-1) * mask
    weights = probs / probs.sum(-1, keepdim=True)
    if item_mask is not None:
        mask = mask & item_mask[:, None]
    return Routing(logits, mask, weights, torch.zeros(n, 1, dtype=torch.long), mask.sum(0), {}, item_mask)


def reference(layer: MoELayer, tokens: torch.Tensor, r: Routing) -> torch.Tensor:
    """Per-token loop: the definition the fast path must reproduce."""
    n, cols = r.mask.shape
    valid = torch.ones(n, dtype=torch.bool) if r.item_mask is None else r.item_mask
    mask = r.mask & valid[:, None]
    kept = mask.clone()
    p = layer.params
    if p.capacity_factor is not None:
        basis = int(mask.sum()) if p.capacity_basis == "pairs" else int(valid.sum())
        cap = max(p.min_capacity, math.ceil(p.capacity_factor * basis / cols))
        for e in range(layer.num_experts):
            toks = [t for t in range(n) if kept[t, e]]
            if p.drop_policy == "probs":
                toks.sort(key=lambda t: -float(r.logits[t, e].detach()))
            for t in toks[cap:]:
                kept[t, e] = False
    w = r.weights
    gate_mask = mask
    if p.renormalize_drops:  # UniMoE-Audio: kept weights rescaled per token, gate over kept columns
        gate_mask = kept
        rows = []
        for t in range(n):
            after = (w[t] * kept[t]).sum()
            rows.append(w[t] * kept[t] * ((w[t] * mask[t]).sum() / after) if after != 0 else w[t] * 0)
        w = torch.stack(rows)
    shared_w = None
    if layer.shared_gate is not None:
        joint = torch.cat([r.logits.masked_fill(~gate_mask, -math.inf), layer.shared_gate(tokens)], -1).softmax(-1)
        w = w * joint[:, :cols].sum(-1, keepdim=True)
        shared_w = joint[:, cols:]
    rows = []
    for t in range(n):
        y = torch.zeros(tokens.shape[1], dtype=tokens.dtype)
        if valid[t]:
            x = tokens[t : t + 1]
            for e in range(layer.num_experts):
                if kept[t, e]:
                    y = y + w[t, e] * layer.experts.expert_forward(e, x)[0]
            for s in range(layer.num_shared):
                y = y + (1.0 if shared_w is None else shared_w[t, s]) * layer.shared.expert_forward(s, x)[0]
        rows.append(y)
    return torch.stack(rows)


def grads(layer, tokens, r, out):
    torch.manual_seed(7)
    params = [tokens, r.logits] + [p for p in layer.parameters() if p.requires_grad]
    g = torch.autograd.grad(out, params, torch.randn_like(out), allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if x is None else x for p, x in zip(params, g)]


CASES = [
    dict(),
    dict(num_shared=2, shared_mode="gated"),
    dict(num_shared=1, shared_mode="unit"),
    dict(num_shared=2, shared_mode="unit", shared_d_ff=12),
    dict(capacity_factor=0.8),
    dict(capacity_factor=0.8, drop_policy="probs", num_shared=1),
    dict(capacity_factor=0.5, capacity_basis="tokens", renormalize_drops=True, num_shared=2, shared_mode="gated"),
    dict(capacity_factor=0.6, drop_policy="probs", renormalize_drops=True),
]


@pytest.mark.parametrize("kind", ["topk", "topp"])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
@pytest.mark.parametrize(
    "expert,dispatch",
    [
        ("swiglu", "auto"),
        ("swiglu", "fused"),
        ("swiglu", "loop"),
        ("swiglu", "xformers"),
        ("swiglu", "gathered"),
        ("swiglu", "dense"),
        ("swiglu", "picked"),
        ("mlp", "auto"),
        ("mlp", "xformers"),
        ("mlp", "dense"),
    ],
)
def test_fast_dispatch_matches_reference_loop(kind, kw, expert, dispatch):
    layer = make_layer(expert, dispatch=dispatch, **kw)
    n = 24
    item_mask = torch.ones(n, dtype=torch.bool)
    item_mask[-3:] = False
    r = hand_routing(n, kind, item_mask)
    tokens = torch.randn(n, D, dtype=torch.float64, requires_grad=True)
    fast = layer.combine(tokens, r)
    ref = reference(layer, tokens, r)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads(layer, tokens, r, fast), grads(layer, tokens, r, ref)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert torch.all(fast[-3:] == 0), "padded tokens must get a zero output"
    assert layer.last_plan == ({"swiglu": "fused", "mlp": "loop"}[expert] if dispatch == "auto" else dispatch)
    if dispatch == "auto" and expert == "swiglu":
        assert type(layer.experts).__name__ == "GroupedSwiGLU" and tuple(layer.experts.gate_up_proj.shape) == (E, 16, D)
    if kw.get("capacity_factor"):
        assert layer.last_stats["dropped_pairs"] > 0
        assert int(r.dropped.sum()) == layer.last_stats["dropped_pairs"] and r.dropped[-3:].sum() == 0
        assert "dropped_share" in r.summary()
    else:
        assert layer.last_stats["dropped_pairs"] == 0 and r.dropped is None


def test_token_that_loses_every_pick_gets_zero_and_finite_gradients():
    layer = make_layer(capacity_factor=1e-3, renormalize_drops=True)  # capacity = min_capacity = 1
    n = 6
    logits = torch.randn(n, E + NULL, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(n, E + NULL, dtype=torch.bool)
    mask[:, :2] = True  # everyone wants experts 0 and 1: only token 0 fits
    weights = logits.softmax(-1) * mask
    r = Routing(logits, mask, weights, torch.zeros(n, 1, dtype=torch.long), mask.sum(0))
    tokens = torch.randn(n, D, dtype=torch.float64, requires_grad=True)
    out = layer.combine(tokens, r)
    assert r.dropped.tolist() == [0] + [2] * (n - 1) and layer.last_stats["capacity"] == 1
    assert torch.all(out[1:] == 0) and torch.any(out[0] != 0)
    out.square().sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(tokens.grad).all()


@pytest.mark.parametrize("kind", ["topk", "topp"])
def test_slot_order_gives_unique_tokens_per_slot_sorted_by_expert(kind):
    from audiomoe.moe import dispatcher

    r = hand_routing(40, kind)
    exp, tok, _ = dispatcher.sorted_pairs(r.mask, E)
    order, sizes, groups = dispatcher.slot_order(exp, tok, E)
    assert sorted(order.tolist()) == list(range(exp.numel()))
    per_token = r.mask[:, :E].sum(-1)
    assert len(sizes) == int(per_token.max()) and sizes == sorted(sizes, reverse=True)
    if kind == "topk":
        assert len(sizes) <= 2
    for j, (slot_exp, slot_tok) in enumerate(zip(exp[order].split(sizes), tok[order].split(sizes))):
        assert slot_tok.unique().numel() == slot_tok.numel(), "a slot must not repeat a token"
        assert torch.all(slot_exp[1:] >= slot_exp[:-1]) and torch.bincount(slot_exp, minlength=E).tolist() == groups[j]
        assert int((per_token > j).sum()) == slot_tok.numel()


def test_grouped_mm_path_matches_loop():
    layer = make_layer("swiglu", num_shared=1).float()
    r = hand_routing(40, "topp")
    x = torch.randn(40, D, requires_grad=True)
    from audiomoe.moe import dispatcher

    exp, tok, counts = dispatcher.sorted_pairs(r.mask, E)
    xs = x.index_select(0, tok)
    a = layer.experts.forward_sorted(xs, counts.tolist())
    b = layer.experts.forward_grouped_mm(xs, counts.tolist())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x, *layer.experts.parameters()], g, retain_graph=True)
    gb = torch.autograd.grad(b, [x, *layer.experts.parameters()], g)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "n, f, block_rows",
    [(2100, 64, None), (2100, 64, 300), (8200, 16, 700)],
    ids=["one-block", "per-expert-blocks", "narrow"],
)
def test_fused_dispatch_reusing_scratch_across_stacked_layers_matches_plain_autograd(n, f, block_rows, monkeypatch):
    """Sizes above the workspace threshold: two layers in one graph share the CPU scratch buffers.

    The fused node keeps no [S, d] tensor between forward and backward (it gathers the rows again), so
    the second layer reusing the first layer's buffers must not change any output or gradient. Also with
    one expert per block and with narrow experts (2F < d: the down-projection gradient transposed).
    """
    from audiomoe.moe import dispatcher, fused

    d, e = 64, 8
    assert 2 * n * f >= 1 << 18  # S * f above 2**18 elements: the scratch path
    if block_rows:
        monkeypatch.setattr(fused, "BLOCK_BYTES", block_rows * d * 8)
        assert len(fused.blocks_of(fused.bounds_of([2 * n // e] * e), 2 * n, d * 8)) == e
    torch.manual_seed(0)
    layers = [moe(d, expert={"name": "swiglu", "params": {"d_ff": f}}, num_experts=e).double() for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    routings = []
    for _ in layers:
        top = torch.randn(n, e, generator=g, dtype=torch.float64).topk(2, -1).indices
        mask = torch.zeros(n, e, dtype=torch.bool).scatter(-1, top, True)
        w = torch.rand(n, e, generator=g, dtype=torch.float64).mul(mask).requires_grad_(True)
        routings.append(Routing(torch.zeros(n, e, dtype=torch.float64), mask, w, top, mask.sum(0)))

    def plain(layer, x, r):
        exp, tok, counts = dispatcher.sorted_pairs(r.mask, e)
        chunks = x.index_select(0, tok).split(counts.tolist())
        ys = torch.cat([layer.experts.expert_forward(i, c) for i, c in enumerate(chunks)]) * r.weights[
            tok, exp
        ].unsqueeze(-1)
        return torch.zeros_like(x).index_add(0, tok, ys)

    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    params = (
        [x] + [r.weights for r in routings] + [p for layer in layers for p in layer.parameters() if p.requires_grad]
    )
    outs = []
    for combine in (lambda layer, h, r: layer.combine(h, r), plain):
        h = x
        for layer, r in zip(layers, routings):
            h = torch.tanh(combine(layer, h, r)) + h
        gr = torch.autograd.grad(
            h,
            params,
            torch.randn(n, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
            allow_unused=True,
        )
        outs.append((h.detach(), [torch.zeros_like(p) if v is None else v for p, v in zip(params, gr)]))
    assert layers[0].last_plan == "fused"
    (h_fast, g_fast), (h_ref, g_ref) = outs
    torch.testing.assert_close(h_fast, h_ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    fused.release_workspace()


@pytest.mark.parametrize("mode", ["gated", "unit"])
def test_null_only_token_gets_shared_only_output(mode):
    layer = make_layer(num_shared=2, shared_mode=mode)
    r = hand_routing(8, "topp")
    tokens = torch.randn(8, D, dtype=torch.float64)
    out = layer.combine(tokens, r)
    x = tokens[:2]
    if mode == "unit":
        expected = sum(layer.shared.expert_forward(s, x) for s in range(2))
    else:  # only shared columns compete with null mass; shared weights are their joint probability
        cols = E + NULL
        joint = torch.cat([r.logits[:2].masked_fill(~r.mask[:2], -math.inf), layer.shared_gate(x)], -1).softmax(-1)
        expected = sum(joint[:, cols + s, None] * layer.shared.expert_forward(s, x) for s in range(2))
    torch.testing.assert_close(out[:2], expected)
    assert layer.last_stats["routed_pairs"] == int(r.mask[:, :E].sum())


def test_null_only_without_shared_is_zero_and_costs_no_pairs():
    layer = make_layer()
    n = 6
    logits = torch.randn(n, E + NULL, dtype=torch.float64)
    mask = torch.zeros(n, E + NULL, dtype=torch.bool)
    mask[:, E] = True
    r = Routing(logits, mask, mask.double(), torch.zeros(n, 1, dtype=torch.long), mask.sum(0))
    out = layer.combine(torch.randn(n, D, dtype=torch.float64), r)
    assert torch.all(out == 0) and layer.last_stats["routed_pairs"] == 0


def test_forward_bnd_with_padding_ignores_padded_tokens():
    layer = make_layer(num_shared=1).float()
    x = torch.randn(2, 7, D)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    y, routing = layer(x, pad)
    assert y.shape == x.shape and torch.all(y[1, 4:] == 0)
    assert routing.null_columns == NULL and routing.item_shape == (2, 7)
    assert int(routing.mask.reshape(2, 7, -1)[1, 4:].sum()) == 0
    assert int(routing.counts.sum()) == int(routing.mask.sum())
    # changing padded content changes nothing at valid positions
    x2 = x.clone()
    x2[1, 4:] = 100.0
    y2, _ = layer(x2, pad)
    torch.testing.assert_close(y2[~pad], y[~pad])
    assert layer.last_stats["tokens"] == 11
    y.sum().backward()
    assert all(p.grad is not None for p in layer.router.parameters())


def test_active_parameters_follow_measured_picks():
    layer = make_layer(num_shared=1)
    per_expert = sum(p.numel() for p in layer.experts.parameters()) / E
    fixed = sum(p.numel() for p in layer.router.parameters()) + sum(p.numel() for p in layer.shared.parameters())
    fixed += layer.shared_gate.weight.numel()
    assert layer.num_active_parameters() == fixed + 2 * per_expert  # router k before any forward
    r = hand_routing(24, "topp")
    layer.combine(torch.randn(24, D, dtype=torch.float64), r)
    measured = int(r.mask[:, :E].sum()) / 24
    assert layer.num_active_parameters() == pytest.approx(fixed + measured * per_expert)


def test_bad_options_are_named():
    with pytest.raises(audiomoe.ConfigError, match="shared_mode"):
        make_layer(num_shared=1, shared_mode="sum")
    with pytest.raises(audiomoe.ConfigError, match="capacity_factor"):
        make_layer(capacity_factor=0.0)
    layer = make_layer()
    with pytest.raises(AudioMoEError, match="d_model=16"):
        layer(torch.randn(3, 5).double())
    with pytest.raises(audiomoe.ConfigError, match="dispatch"):
        make_layer(dispatch="fast")
    with pytest.raises(AudioMoEError, match="grouped SwiGLU experts"):
        make_layer("mlp", dispatch="fused")
    with pytest.raises(AudioMoEError, match="grouped_mm.*float64"):
        make_layer(dispatch="grouped_mm")(torch.randn(3, D, dtype=torch.float64))
    with pytest.raises(audiomoe.ConfigError, match="capacity_basis"):
        make_layer(capacity_basis="experts")


def test_backend_auto_falls_back_to_torch_on_cpu_with_one_log_line(caplog):
    from audiomoe.moe import backends

    backends._LOGGED.clear()
    with caplog.at_level("INFO", logger="audiomoe.experts"):
        assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"
        assert backends.resolve_backend("xformers", torch.device("cpu")) == "torch"
        assert backends.resolve_backend("auto", torch.device("cpu")) == "torch"
    lines = [r.getMessage() for r in caplog.records if "MoE backend" in r.getMessage()]
    assert len(lines) == 2 and all("torch" in line for line in lines)
    with pytest.raises(AudioMoEError, match="triton"):
        backends.resolve_backend("triton", torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("plan", ["fused", "grouped_mm", "xformers", "gathered", "dense", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dispatch_plans_match_the_loop(plan, dtype):
    """Every plan (xformers' Triton gather/scatter when installed) equals the loop on the GPU."""
    x = torch.randn(512, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(dtype)
    results = {}
    for p in ("loop", plan):
        torch.manual_seed(0)
        layer = (
            moe(64, expert={"name": "swiglu", "params": {"d_ff": 64}}, num_experts=8, num_shared=1, dispatch=p)
            .cuda()
            .to(dtype)
        )
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        y.float().square().sum().backward()
        results[p] = (y.detach().float(), xi.grad.float(), layer.experts.gate_up_proj.grad.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(results["loop"], results[plan]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
