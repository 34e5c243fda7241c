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
from fnmatch import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from audiomoe.core.composer import component_builder, compose
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import BASES, BackboneOutput, EncoderOutput, Routing
from audiomoe.core.registry import Registry, canonical_kind
from audiomoe.core.routing import indices_problems, routing_problems

#: Sizes injected when a component is built alone (override with ``context=``).
DEFAULT_CONTEXT: dict[str, Any] = {
    "d_model": 16, "num_experts": 4, "task_names": ["a", "b"], "task_name": "a", "d_base": 16, "weak_dim": 16, "num_weak": 3, "in_dim": 12,
}  # fmt: skip


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


#: A gradient whose largest entry is below this is float noise, not learning (a P/P weight gives ~1e-7 in float32).
GRAD_TOL = 1e-6


def _exempt(module: torch.nn.Module) -> tuple[list[str], list[str]]:
    """``(prefixes, globs)`` of parameter names exempt from the gradient rule.

    Prefixes: children the last forward routed nothing to (``Component.idle_children``); globs:
    tensors without a task gradient by construction (``Component.gradient_exempt``).
    """
    prefixes, globs = [], []
    for path, m in module.named_modules():
        pre = f"{path}." if path else ""
        idle = getattr(m, "idle_children", None)  # MoE layers are plain modules inside backbones
        if callable(idle):
            prefixes += [f"{pre}{c}." for c in idle()]
        globs += [f"{pre}{g}" for g in getattr(m, "gradient_exempt", ())]
    return prefixes, globs


def _grads(report: ConformanceReport, module: torch.nn.Module, loss: torch.Tensor, what: str, aux: Optional[torch.Tensor] = None) -> None:
    """Every trainable tensor gets a non-negligible gradient from ``loss`` alone (timm's num_params == num_grad).

    Tensors of routed children no item selected are exempt (named in the report). ``aux`` (the aux
    losses, checked separately) must reach at least one tensor when it has a graph.
    """
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        report.ok("no trainable parameters (nothing to check)")
        return
    idle, globs = _exempt(module)
    checked = [(n, p) for n, p in trainable if not any(n.startswith(i) for i in idle) and not any(fnmatch(n, g) for g in globs)]
    params = [p for _, p in checked]
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=aux is not None) if loss.requires_grad else [None] * len(params)
    for (n, _), g in zip(checked, grads):
        if g is not None and not torch.isfinite(g).all():
            _fail(report, f"gradient of '{n}' contains NaN or inf")
    dead = [n for (n, _), g in zip(checked, grads) if g is None or float(g.abs().max()) <= GRAD_TOL]
    if dead:
        shown = ", ".join(dead[:6]) + (f" and {len(dead) - 6} more" if len(dead) > 6 else "")
        _fail(
            report,
            f"{len(dead)} of {len(checked)} trainable tensors get no gradient (max |g| <= {GRAD_TOL:g}) from {what} alone, "
            f"aux losses off: {shown}. A top-1 router with renormalised weights (p/p = 1) is the usual cause: "
            "weight by the raw probability or a straight-through estimator",
        )
    skipped = f"; {len(trainable) - len(checked)} exempt (idle routed children, declared gradient_exempt)" if len(checked) < len(trainable) else ""
    report.ok(f"task-loss gradients reach {len(checked)}/{len(checked)} checked parameter tensors{skipped}")
    if aux is not None and aux.requires_grad:
        # connectivity, not size: a balance loss at perfect balance has an exactly zero gradient
        ga = torch.autograd.grad(aux, params, allow_unused=True)
        reached = [g for g in ga if g is not None]
        if not reached:
            _fail(report, "the aux losses are not connected to any parameter")
        report.ok(f"aux losses reach {len(reached)} parameter tensors (max |g| {max(float(g.abs().max()) for g in reached):.2e})")


def _probe_loss(y: torch.Tensor) -> torch.Tensor:
    """A loss along a fixed random direction: unlike ``y.pow(2).mean()`` it is not constant under a final LayerNorm.

    A sum, not a mean: gradients stay O(1) whatever the output size, so one absolute tolerance
    (:data:`GRAD_TOL`) separates learning from float noise.
    """
    g = torch.Generator().manual_seed(1234)
    return (y * torch.randn(y.shape, generator=g).to(y)).sum()


def _aux_sum(aux: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """Sum of the aux losses, or None without any."""
    return sum(aux.values(), torch.zeros(())) if aux else None


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
        _fail(report, f"routing.counts must equal mask.sum(0) over valid items: expected {r.mask.sum(0).tolist()}, got {r.counts.tolist()}")
    for problem in indices_problems(r):
        _fail(report, problem)
    _finite(report, r.weights, "weights")
    report.ok(f"routing over {e} columns, padded items ignored")
    _grads(report, router, (r.weights * torch.randn_like(r.weights)).sum(), "a loss on the combine weights", _aux_sum(r.aux_losses))


def _check_expert(report: ConformanceReport, expert: Any, context: Mapping[str, Any]) -> None:
    d = int(context["d_model"])
    x = torch.randn(7, d)
    y = expert(x)
    if tuple(y.shape) != (7, d) or y.dtype != x.dtype:
        _fail(report, f"output shape/dtype: expected float32 [7, {d}] for input [7, {d}], got {y.dtype} {tuple(y.shape)}")
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
        _fail(report, f"output shape: expected [2, {n_out}, d_model={d}] for [2, 10, {c}] at stride {adapter.stride}, got {tuple(y.shape)}")
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
    weak = {k: (mask[:, k].nonzero().flatten(), torch.randn(int(mask[:, k].sum()), 5, c)) for k in range(m) if mask[:, k].any()}
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
    extra = {"decoder": build_component("backbone", "causal_lm", {}, {"d_model": d})} if getattr(task, "reads_decoder", False) else {}
    outputs = task(feats, pad, **extra)
    if isinstance(outputs, torch.Tensor) and (outputs.dim() == 0 or outputs.shape[0] != 3):
        _fail(report, f"output shape: expected [3, ...] (one row per item) for features [3, 8, {d}], got {tuple(outputs.shape)}")
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


_CHECKS: dict[str, Callable[..., None]] = {
    "encoder": lambda r, m, c: _check_encoder(r, m, c),
    "router": _check_router,
    "expert": _check_expert,
    "moe": _check_moe,
    "fusion": _check_fusion,
    "adapter": _check_adapter,
    "backbone": _check_backbone,
    "head": _check_head,
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

    A scorer or selector is checked inside the composite ``scored`` router (the router contract);
    a plugin's own kinds without a base class are checked for building from defaults only.
    """
    kind = canonical_kind(kind)  # 'task' (deprecated) checks as 'head'
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
    elif kind in ("scorer", "selector"):  # a router's part: its contract is the router's, checked through the composite
        try:
            router = build_component("router", "builtin:scored", {kind: {"name": name, "params": dict(params or {})}}, ctx, registry)
            router.train()
            _check_router(report, router, ctx)
        except AudioMoEError as exc:
            _fail(report, f"as the {kind} of router 'scored': {exc}")
    return report


def check_preset(name: str, overrides: tuple[str, ...] = (), registry: Optional[Registry] = None) -> ConformanceReport:
    """Compose a preset, train one step on a random batch, and check the rebuild from ``model.spec``.

    Checks: finite loss with every task's head used, gradients, predictions for every task, and that
    ``compose(model.spec)`` gives the same architecture and parameters.
    """
    from audiomoe.core.batch import AudioBatch

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
    targets = [model.heads[tname].example_targets(1)[0] for tname in item_tasks]
    # a target's template fields (a question) are also what the head needs to predict without targets
    prompts = [{k: v for k, v in x.items() if k != "answer"} if isinstance(x, Mapping) else None for x in targets]
    torch.manual_seed(0)
    batch = AudioBatch(torch.randn(b, t) * 0.1, sr, item_tasks, torch.tensor([t - 97 * i for i in range(b)]), targets, prompts)
    out = model(batch)
    if out.loss is None or not torch.isfinite(out.loss):
        _fail(report, f"loss is not finite: {out.loss}")
    if set(out.predictions) != set(item_tasks):
        _fail(report, f"predictions for {sorted(out.predictions)}, expected {sorted(set(item_tasks))}")
    task_loss = sum(float(model.heads[t].loss_weight if hasattr(model.heads[t], "loss_weight") else 1.0) * out.losses[f"task/{t}"] for t in set(item_tasks))
    aux = {k: v for k, v in out.losses.items() if k.startswith("aux/")}
    _grads(report, model, task_loss, "the task losses", _aux_sum(aux))
    again = compose(model.spec, registry=registry)
    sa, sb = initial, again.state_dict()
    if list(sa) != list(sb) or any(sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]) for k in sa):
        _fail(report, "compose(model.spec) does not rebuild the same parameters")
    report.ok("compose(model.spec) rebuilds identical parameters")
    return report
