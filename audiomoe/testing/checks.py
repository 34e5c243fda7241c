"""Per-kind conformance checks: each builds nothing, it receives a built component and verifies its kind's
contract (shapes, dtypes, finite values, gradients reaching the parameters, padded items ignored)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from audiomoe.core.interfaces import BackboneOutput, EncoderOutput, Routing
from audiomoe.core.routing import indices_problems, routing_problems
from audiomoe.testing.contract import (
    GRAD_TOL,
    ConformanceReport,
    _aux_sum,
    _fail,
    _finite,
    _grads,
    _probe_loss,
    build_component,
)


def _check_encoder(report: ConformanceReport, enc: Any, context: Mapping[str, Any]) -> None:
    for attr in ("sample_rate", "output_dim", "frame_rate"):
        if not hasattr(enc, attr):
            _fail(report, f"encoders must set '{attr}' in __init__")
    sr = int(enc.sample_rate)
    t = max(sr // 2, 1600)
    wav = torch.randn(2, t) * 0.1
    lengths = torch.tensor([t, t // 2])
    n_tasks = max(len(context.get("task_names", [])), 1)
    kwargs = {"task_ids": torch.arange(2) % n_tasks} if getattr(enc, "accepts_task_ids", False) else {}
    out = enc(wav, lengths, **kwargs)
    if not isinstance(out, EncoderOutput):
        _fail(report, f"forward must return EncoderOutput, got {type(out).__name__}")
    f, m = out.features, out.padding_mask
    if f.dim() != 3 or f.shape[0] != 2 or f.shape[2] != enc.output_dim:
        _fail(report, f"features must be [2, N, output_dim={enc.output_dim}], got {tuple(f.shape)}")
    if m.shape != f.shape[:2] or m.dtype != torch.bool:
        _fail(report, f"padding_mask must be bool [2, {f.shape[1]}], got {m.dtype} {tuple(m.shape)}")
    if f.dtype != torch.float32:
        _fail(report, f"features must be float32 for float32 input, got {f.dtype}")
    if (~m[0]).sum() < (~m[1]).sum() or m[1].sum() == 0:
        _fail(report, "the half-length item must have more padded frames than the full-length one")
    _finite(report, f, "features")
    report.ok(f"features {tuple(f.shape)}, padding mask consistent with lengths")
    _grads(report, enc, _probe_loss(f[~m]), "the valid features", _aux_sum(out.aux_losses))


def _check_router(report: ConformanceReport, router: Any, context: Mapping[str, Any]) -> None:
    n, d = 12, int(context["d_model"])
    e = int(context["num_experts"])
    x = torch.randn(n, d, requires_grad=True)
    item_mask = torch.ones(n, dtype=torch.bool)
    item_mask[-2:] = False
    task_ids = torch.arange(n) % max(len(context.get("task_names", [])), 1)
    r = router(x, item_mask=item_mask, task_ids=task_ids)
    for problem in routing_problems(r, n, e):
        _fail(report, problem)
    if r.mask[~item_mask].any() or r.weights[~item_mask].abs().sum() > 0:
        _fail(report, "padded items must select nothing and get zero weight")
    if (r.weights[~r.mask] != 0).any():
        _fail(report, "weights must be zero where mask is False")
    if not torch.equal(r.counts.long(), r.mask.sum(0).long()):
        _fail(
            report,
            f"routing.counts must equal mask.sum(0) over valid items: expected {r.mask.sum(0).tolist()}, got {r.counts.tolist()}",
        )
    for problem in indices_problems(r):
        _fail(report, problem)
    _finite(report, r.weights, "weights")
    report.ok(f"routing over {e} columns, padded items ignored")
    _grads(
        report,
        router,
        (r.weights * torch.randn_like(r.weights)).sum(),
        "a loss on the combine weights",
        _aux_sum(r.aux_losses),
    )


def _check_expert(report: ConformanceReport, expert: Any, context: Mapping[str, Any]) -> None:
    d = int(context["d_model"])
    x = torch.randn(7, d)
    y = expert(x)
    if tuple(y.shape) != (7, d) or y.dtype != x.dtype:
        _fail(
            report, f"output shape/dtype: expected float32 [7, {d}] for input [7, {d}], got {y.dtype} {tuple(y.shape)}"
        )
    _finite(report, y, "output")
    if expert(x[:0]).shape != (0, d):
        _fail(report, "expert must accept an empty batch of tokens (an expert nobody picked)")
    report.ok("token FFN shape and dtype")
    _grads(report, expert, _probe_loss(y), "the output")


def _check_adapter(report: ConformanceReport, adapter: Any, context: Mapping[str, Any]) -> None:
    d, c = int(context["d_model"]), int(context["in_dim"])
    x = torch.randn(2, 10, c)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 4:] = True
    y, p = adapter(x, pad)
    n_out = -(-10 // int(adapter.stride))
    if tuple(y.shape) != (2, n_out, d) or tuple(p.shape) != (2, n_out):
        _fail(
            report,
            f"output shape: expected [2, {n_out}, d_model={d}] for [2, 10, {c}] at stride {adapter.stride}, got {tuple(y.shape)}",
        )
    x2 = x.clone()
    x2[1, 4:] = 100.0
    if not torch.allclose(adapter(x2, pad)[0][~p], y[~p], atol=1e-5):
        _fail(report, "padded input frames must not change valid outputs")
    _finite(report, y, "output")
    report.ok(f"[2, 10, {c}] -> {tuple(y.shape)}, padding kept out")
    _grads(report, adapter, _probe_loss(y[~p]), "the valid outputs")


def _check_fusion(report: ConformanceReport, fusion: Any, context: Mapping[str, Any]) -> None:
    d, c, m = int(context["d_base"]), int(context["weak_dim"]), int(context["num_weak"])
    base = torch.randn(3, 5, d, requires_grad=True)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[2, 3:] = False
    routings = fusion.route(base, valid, torch.tensor([0, 1, 0]))
    if not routings or not all(isinstance(r, Routing) and tuple(r.mask.shape) == (3, m) for r in routings.values()):
        _fail(report, f"route must return named Routing records with mask [3, num_weak={m}]")
    mask = torch.stack([r.mask for r in routings.values()]).any(0)
    weak = {
        k: (mask[:, k].nonzero().flatten(), torch.randn(int(mask[:, k].sum()), 5, c))
        for k in range(m)
        if mask[:, k].any()
    }
    h = fusion(base, weak, routings)
    if tuple(h.shape) != (3, 5, int(fusion.output_dim)):
        _fail(report, f"output shape: expected [3, 5, output_dim={fusion.output_dim}], got {tuple(h.shape)}")
    _finite(report, h, "fused features")
    report.ok(f"{len(routings)} routing record(s), fused width {fusion.output_dim}")
    aux = _aux_sum({f"{n}/{k}": v for n, r in routings.items() for k, v in r.aux_losses.items()})
    _grads(report, fusion, _probe_loss(h), "the fused features", aux)


def _padded_sequences(context: Mapping[str, Any]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(d, x [2, 6, d], padding_mask)`` with the second sequence padded after 4 frames."""
    d = int(context["d_model"])
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    return d, torch.randn(2, 6, d), pad


def _check_moe(report: ConformanceReport, layer: Any, context: Mapping[str, Any]) -> None:
    d, x, pad = _padded_sequences(context)
    out = layer(x, pad)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Routing)):
        _fail(report, "forward must return (y, Routing)")
    y, routing = out
    if tuple(y.shape) != (2, 6, d):
        _fail(report, f"output shape: expected [2, 6, {d}] for input [2, 6, {d}], got {tuple(y.shape)}")
    if (y[pad] != 0).any():
        _fail(report, "padded tokens must get a zero output")
    _finite(report, y, "output")
    report.ok("token shape preserved, padded tokens zero")
    _grads(report, layer, _probe_loss(y[~pad]), "the valid outputs", _aux_sum(routing.aux_losses))


def _check_backbone(report: ConformanceReport, backbone: Any, context: Mapping[str, Any]) -> None:
    d, x, pad = _padded_sequences(context)
    out = backbone(x, pad)
    if not isinstance(out, BackboneOutput) or tuple(out.hidden.shape) != (2, 6, d):
        _fail(report, f"forward must return BackboneOutput with hidden [2, 6, {d}]")
    _finite(report, out.hidden, "hidden")
    report.ok("hidden shape preserved")
    _grads(report, backbone, _probe_loss(out.hidden[~pad]), "the valid hidden states", _aux_sum(out.aux_losses))


def _check_head(report: ConformanceReport, task: Any, context: Mapping[str, Any]) -> None:
    d = int(context["d_model"])
    feats = torch.randn(3, 8, d, requires_grad=True)
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[2, 5:] = True
    example = getattr(task, "example_targets", None)
    if not callable(example):
        _fail(report, "tasks must implement example_targets(n) so they can be checked")
    targets = task.make_targets(example(3), feats.device)
    # a head that writes through the shared decoder is checked on a tiny random causal LM of width d
    extra = (
        {"decoder": build_component("backbone", "causal_lm", {}, {"d_model": d})}
        if getattr(task, "reads_decoder", False)
        else {}
    )
    outputs = task(feats, pad, **extra)
    if isinstance(outputs, torch.Tensor) and (outputs.dim() == 0 or outputs.shape[0] != 3):
        _fail(
            report,
            f"output shape: expected [3, ...] (one row per item) for features [3, 8, {d}], got {tuple(outputs.shape)}",
        )
    terms = task.loss_terms(outputs, targets)
    loss = terms.loss
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        _fail(report, "loss must be a scalar tensor")
    _finite(report, loss, "loss")
    preds = task.predict(outputs)
    metrics = task.metrics(preds, targets)
    if not isinstance(metrics, Mapping) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        _fail(report, "metrics must be a mapping of name -> float")
    report.ok(f"loss {float(loss.detach()):.3f}, metrics {sorted(metrics)}")
    (gf,) = torch.autograd.grad(loss, feats, retain_graph=True, allow_unused=True)
    if gf is None or float(gf.abs().max()) <= GRAD_TOL:
        _fail(report, "the loss must depend on the features")
    _grads(report, task, loss, "the task loss", _aux_sum(terms.aux_losses))


def _check_codec(report: ConformanceReport, codec: Any, context: Mapping[str, Any]) -> None:
    """Declared rates and sizes; encode a padded batch to in-range long codes and frame lengths; decode back."""
    for attr in ("sample_rate", "frame_rate", "num_codebooks", "codebook_size"):
        v = getattr(codec, attr, None)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            _fail(report, f"a codec must declare a positive number '{attr}', got {v!r}")
    sr, k, v = int(codec.sample_rate), int(codec.num_codebooks), int(codec.codebook_size)
    per_frame = sr / float(codec.frame_rate)  # samples per frame
    t = max(sr // 4, int(4 * per_frame))
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(2, t, generator=g)
    lengths = torch.tensor([t, t - int(1.5 * per_frame)])
    x[1, int(lengths[1]) :] = 0
    codes, frames = codec.encode(x, lengths)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.long or codes.dim() != 3:
        _fail(
            report, f"encode must return codes as a long [B, K, F] tensor, got {getattr(codes, 'dtype', type(codes))}"
        )
    if codes.shape[:2] != (2, k):
        _fail(report, f"codes of a batch of 2 must be [2, num_codebooks={k}, F], got {tuple(codes.shape)}")
    if int(codes.min()) < 0 or int(codes.max()) >= v:
        _fail(report, f"codes must lie in [0, codebook_size={v}), got [{int(codes.min())}, {int(codes.max())}]")
    f = codes.shape[-1]
    if abs(f - t / per_frame) > 1.5:
        _fail(
            report,
            f"{t} samples at {sr} Hz give {f} frames; frame_rate {codec.frame_rate} says about {t / per_frame:.1f}",
        )
    fl = [int(n) for n in frames]
    if len(fl) != 2 or fl[0] != f or not 1 <= fl[1] < fl[0]:
        _fail(report, f"frame lengths must be [B] with the longest item filling all {f} frames, got {fl}")
    again, _ = codec.encode(x, lengths)
    if not torch.equal(codes, again):
        _fail(report, "encode must be deterministic (the same audio gives the same codes)")
    wav = codec.decode(codes)
    if not isinstance(wav, torch.Tensor) or not wav.is_floating_point() or wav.dim() != 2 or wav.shape[0] != 2:
        _fail(report, f"decode must return float waveforms [B, T], got {getattr(wav, 'shape', type(wav))}")
    _finite(report, wav, "decoded audio")
    if abs(wav.shape[1] - f * per_frame) > 2 * per_frame:
        _fail(report, f"{f} frames decode to {wav.shape[1]} samples; expected about {f * per_frame:.0f} at {sr} Hz")
    report.ok(f"codes [2, {k}, {f}] in [0, {v}), frame lengths {fl}, decoded to {wav.shape[1]} samples at {sr} Hz")


_CHECKS: dict[str, Callable[..., None]] = {
    "encoder": lambda r, m, c: _check_encoder(r, m, c),
    "router": _check_router,
    "expert": _check_expert,
    "moe": _check_moe,
    "fusion": _check_fusion,
    "adapter": _check_adapter,
    "backbone": _check_backbone,
    "head": _check_head,
    "codec": _check_codec,
}
