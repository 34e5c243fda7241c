"""Conformance checks for components and presets: what a plugin author runs on their component.

::

    from audiomoe.testing import check_component
    check_component("router", "acme_topk")            # through the registry (entry point installed)
    check_component("router", "acme_topk", params={"k": 1}, context={"num_experts": 8})

Each check builds the component from its params (defaults unless given) with a small injected
context, runs forward and backward on a small batch, and verifies the kind's contract: shapes,
dtypes, finite values, gradients reaching the parameters, padded items ignored. A failure raises
:class:`ConformanceError` saying which rule broke. The project's own test suite runs these checks
over every registered component and every preset, so a new plugin is tested for free.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from .core.composer import component_builder, compose
from .core.errors import AudioMoEError
from .core.interfaces import BASES, BackboneOutput, EncoderOutput, Routing
from .core.registry import Registry

#: Sizes injected when a component is built alone (override with ``context=``).
DEFAULT_CONTEXT: dict[str, Any] = {"d_model": 16, "num_experts": 4, "task_names": ["a", "b"], "task_name": "a"}


class ConformanceError(AssertionError):
    """A component or preset broke its kind's contract; the message says which rule."""


@dataclass
class ConformanceReport:
    """What was checked: ``kind/name`` and the list of rules that passed."""

    kind: str
    name: str
    checks: list[str] = field(default_factory=list)

    def ok(self, what: str) -> None:
        """Record a passed rule."""
        self.checks.append(what)


def _fail(report: ConformanceReport, rule: str) -> None:
    raise ConformanceError(f"{report.kind} '{report.name}': {rule}")


def _finite(report: ConformanceReport, t: torch.Tensor, what: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        _fail(report, f"{what} contains NaN or inf")


def _grads(report: ConformanceReport, module: torch.nn.Module, what: str) -> None:
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        report.ok("no trainable parameters (nothing to check)")
        return
    reached = [n for n, p in trainable if p.grad is not None and torch.count_nonzero(p.grad) > 0]
    if not reached:
        _fail(report, f"backward from {what} gave no gradient to any of its {len(trainable)} trainable parameters")
    for n, p in trainable:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            _fail(report, f"gradient of '{n}' contains NaN or inf")
    report.ok(f"gradients reach {len(reached)}/{len(trainable)} parameter tensors")


def build_component(
    kind: str,
    name: str,
    params: Optional[Mapping[str, Any]] = None,
    context: Optional[Mapping[str, Any]] = None,
    registry: Optional[Registry] = None,
) -> torch.nn.Module:
    """Build one registered component alone, with ``params`` and the injected ``context``."""
    builder = component_builder(kind, {"name": name, "params": dict(params or {})}, registry)
    return builder(**{**DEFAULT_CONTEXT, **(context or {})})


def _check_encoder(report: ConformanceReport, enc: Any) -> None:
    for attr in ("sample_rate", "output_dim", "frame_rate"):
        if not hasattr(enc, attr):
            _fail(report, f"encoders must set '{attr}' in __init__")
    sr = int(enc.sample_rate)
    t = max(sr // 2, 1600)
    wav = torch.randn(2, t) * 0.1
    lengths = torch.tensor([t, t // 2])
    out = enc(wav, lengths)
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
    loss = f[~m].pow(2).mean() + sum((v for v in out.aux_losses.values()), torch.zeros(()))
    loss.backward()
    _grads(report, enc, "the valid features")


def _check_router(report: ConformanceReport, router: Any, context: Mapping[str, Any]) -> None:
    n, d = 12, int(context["d_model"])
    e = int(context["num_experts"])
    x = torch.randn(n, d, requires_grad=True)
    item_mask = torch.ones(n, dtype=torch.bool)
    item_mask[-2:] = False
    task_ids = torch.arange(n) % max(len(context.get("task_names", [])), 1)
    r = router(x, item_mask=item_mask, task_ids=task_ids)
    if not isinstance(r, Routing):
        _fail(report, f"forward must return Routing, got {type(r).__name__}")
    for attr, shape in (("logits", (n, e)), ("mask", (n, e)), ("weights", (n, e))):
        if tuple(getattr(r, attr).shape) != shape:
            _fail(report, f"routing.{attr} must be {shape}, got {tuple(getattr(r, attr).shape)}")
    if r.mask.dtype != torch.bool:
        _fail(report, "routing.mask must be bool")
    if r.mask[~item_mask].any() or r.weights[~item_mask].abs().sum() > 0:
        _fail(report, "padded items must select nothing and get zero weight")
    if (r.weights[~r.mask] != 0).any():
        _fail(report, "weights must be zero where mask is False")
    if not r.mask[item_mask].any(-1).all():
        _fail(report, "every valid item must select at least one column")
    if not torch.equal(r.counts.long(), r.mask.sum(0).long()):
        _fail(report, "routing.counts must equal mask.sum(0) over valid items")
    _finite(report, r.weights, "weights")
    report.ok(f"routing over {e} columns, padded items ignored")
    loss = (r.weights * torch.randn_like(r.weights)).sum() + sum((v for v in r.aux_losses.values()), torch.zeros(()))
    if loss.requires_grad:
        loss.backward()
    _grads(report, router, "the combine weights and aux losses")


def _check_expert(report: ConformanceReport, expert: Any, context: Mapping[str, Any]) -> None:
    d = int(context["d_model"])
    x = torch.randn(7, d)
    y = expert(x)
    if tuple(y.shape) != (7, d) or y.dtype != x.dtype:
        _fail(report, f"expert must map [7, {d}] float32 -> [7, {d}] float32, got {y.dtype} {tuple(y.shape)}")
    _finite(report, y, "output")
    if expert(x[:0]).shape != (0, d):
        _fail(report, "expert must accept an empty batch of tokens (an expert nobody picked)")
    report.ok("token FFN shape and dtype")
    y.pow(2).mean().backward()
    _grads(report, expert, "the output")


def _check_backbone(report: ConformanceReport, backbone: Any, context: Mapping[str, Any]) -> None:
    d = int(context["d_model"])
    x = torch.randn(2, 6, d)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    out = backbone(x, pad)
    if not isinstance(out, BackboneOutput) or tuple(out.hidden.shape) != (2, 6, d):
        _fail(report, f"forward must return BackboneOutput with hidden [2, 6, {d}]")
    _finite(report, out.hidden, "hidden")
    report.ok("hidden shape preserved")
    loss = out.hidden[~pad].pow(2).mean() + sum((v for v in out.aux_losses.values()), torch.zeros(()))
    loss.backward()
    _grads(report, backbone, "the valid hidden states")


def _check_task(report: ConformanceReport, task: Any, context: Mapping[str, Any]) -> None:
    d = int(context["d_model"])
    feats = torch.randn(3, 8, d, requires_grad=True)
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[2, 5:] = True
    example = getattr(task, "example_targets", None)
    if not callable(example):
        _fail(report, "tasks must implement example_targets(n) so they can be checked")
    targets = task.make_targets(example(3), feats.device)
    outputs = task(feats, pad)
    loss = task.loss(outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        _fail(report, "loss must be a scalar tensor")
    _finite(report, loss, "loss")
    preds = task.predict(outputs)
    metrics = task.metrics(preds, targets)
    if not isinstance(metrics, Mapping) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        _fail(report, "metrics must be a mapping of name -> float")
    report.ok(f"loss {float(loss.detach()):.3f}, metrics {sorted(metrics)}")
    loss.backward()
    _grads(report, task, "the loss")
    if feats.grad is None:
        _fail(report, "the loss must depend on the features")


_CHECKS: dict[str, Callable[..., None]] = {
    "encoder": lambda r, m, c: _check_encoder(r, m),
    "router": _check_router,
    "expert": _check_expert,
    "backbone": _check_backbone,
    "task": _check_task,
}


def check_component(
    kind: str,
    name: str,
    params: Optional[Mapping[str, Any]] = None,
    context: Optional[Mapping[str, Any]] = None,
    registry: Optional[Registry] = None,
    seed: int = 0,
) -> ConformanceReport:
    """Build ``kind/name`` and check it against its kind's contract; raise ConformanceError on a break.

    Kinds without a base class (a plugin's own kinds, e.g. router scorers) are checked for building
    from defaults only: their parent component's check exercises them.
    """
    report = ConformanceReport(kind, name)
    ctx = {**DEFAULT_CONTEXT, **(context or {})}
    torch.manual_seed(seed)
    try:
        module = build_component(kind, name, params, ctx, registry)
    except (AudioMoEError, ValueError, TypeError) as exc:
        raise ConformanceError(f"{kind} '{name}' does not build from {dict(params or {})} with {ctx}: {exc}") from exc
    report.ok("builds from params")
    cls = type(module)
    if not (inspect.getdoc(cls) and (inspect.getmodule(cls).__doc__ or "").strip()):
        _fail(report, "the class and its module need docstrings (module: what it implements, the paper/equation)")
    base = BASES.get(kind)
    if base is not None and not isinstance(module, base):
        _fail(report, f"must subclass audiomoe.{base.__name__}")
    check = _CHECKS.get(kind)
    if check is not None:
        module.train()
        check(report, module, ctx)
    return report


def check_preset(name: str, overrides: tuple[str, ...] = (), registry: Optional[Registry] = None) -> ConformanceReport:
    """Compose a preset, train one step on a random batch, and check the rebuild from ``model.spec``.

    Checks: finite loss with every task's head used, gradients, predictions for every task, and that
    ``compose(model.spec)`` gives the same architecture and parameters.
    """
    from .model import AudioBatch

    report = ConformanceReport("preset", name)
    model = compose(name, overrides, registry=registry)
    report.ok("composes")
    # Snapshot before the forward: buffers such as a router's schedule step legitimately move.
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = model.task_names
    b = max(2, len(tasks))
    sr = int(model.encoder.sample_rate)
    t = sr // 2
    item_tasks = [tasks[i % len(tasks)] for i in range(b)]
    targets = []
    for i, tname in enumerate(item_tasks):
        targets.append(model.heads[tname].example_targets(1)[0])
    torch.manual_seed(0)
    batch = AudioBatch(torch.randn(b, t) * 0.1, sr, item_tasks, torch.tensor([t - 97 * i for i in range(b)]), targets)
    out = model(batch)
    if out.loss is None or not torch.isfinite(out.loss):
        _fail(report, f"loss is not finite: {out.loss}")
    if set(out.predictions) != set(item_tasks):
        _fail(report, f"predictions for {sorted(out.predictions)}, expected {sorted(set(item_tasks))}")
    out.loss.backward()
    _grads(report, model, "the total loss")
    again = compose(model.spec, registry=registry)
    sa, sb = initial, again.state_dict()
    if list(sa) != list(sb) or any(sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]) for k in sa):
        _fail(report, "compose(model.spec) does not rebuild the same parameters")
    report.ok("compose(model.spec) rebuilds identical parameters")
    return report
