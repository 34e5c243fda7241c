"""The conformance contract's shared parts: the injected context, the report, gradient and finiteness rules,
and building one component alone (:func:`build_component`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any, Mapping, Optional

import torch

from audiomoe.core.composer import component_builder
from audiomoe.core.registry import Registry

#: Sizes injected when a component is built alone (override with ``context=``).
DEFAULT_CONTEXT: dict[str, Any] = {
    "d_model": 16,
    "num_experts": 4,
    "task_names": ["a", "b"],
    "task_name": "a",
    "d_base": 16,
    "weak_dim": 16,
    "num_weak": 3,
    "in_dim": 12,
}


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


def _grads(
    report: ConformanceReport,
    module: torch.nn.Module,
    loss: torch.Tensor,
    what: str,
    aux: Optional[torch.Tensor] = None,
) -> None:
    """Every trainable tensor gets a non-negligible gradient from ``loss`` alone (timm's num_params == num_grad).

    Tensors of routed children no item selected are exempt (named in the report). ``aux`` (the aux
    losses, checked separately) must reach at least one tensor when it has a graph.
    """
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        report.ok("no trainable parameters (nothing to check)")
        return
    idle, globs = _exempt(module)
    checked = [
        (n, p) for n, p in trainable if not any(n.startswith(i) for i in idle) and not any(fnmatch(n, g) for g in globs)
    ]
    params = [p for _, p in checked]
    grads = (
        torch.autograd.grad(loss, params, allow_unused=True, retain_graph=aux is not None)
        if loss.requires_grad
        else [None] * len(params)
    )
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
    skipped = (
        f"; {len(trainable) - len(checked)} exempt (idle routed children, declared gradient_exempt)"
        if len(checked) < len(trainable)
        else ""
    )
    report.ok(f"task-loss gradients reach {len(checked)}/{len(checked)} checked parameter tensors{skipped}")
    if aux is not None and aux.requires_grad:
        # connectivity, not size: a balance loss at perfect balance has an exactly zero gradient
        ga = torch.autograd.grad(aux, params, allow_unused=True)
        reached = [g for g in ga if g is not None]
        if not reached:
            _fail(report, "the aux losses are not connected to any parameter")
        report.ok(
            f"aux losses reach {len(reached)} parameter tensors (max |g| {max(float(g.abs().max()) for g in reached):.2e})"
        )


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
