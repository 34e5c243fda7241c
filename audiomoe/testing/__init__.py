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
from typing import Any, Mapping, Optional

import torch

from audiomoe.core.composer import compose
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import BASES
from audiomoe.core.registry import Registry, canonical_kind
from audiomoe.testing.checks import _CHECKS, _check_router
from audiomoe.testing.contract import (  # noqa: F401 - the public names of audiomoe.testing
    DEFAULT_CONTEXT,
    GRAD_TOL,
    ConformanceError,
    ConformanceReport,
    _aux_sum,
    _fail,
    _grads,
    build_component,
)


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
            router = build_component(
                "router", "builtin:scored", {kind: {"name": name, "params": dict(params or {})}}, ctx, registry
            )
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
    batch = AudioBatch(
        torch.randn(b, t) * 0.1, sr, item_tasks, torch.tensor([t - 97 * i for i in range(b)]), targets, prompts
    )
    out = model(batch)
    if out.loss is None or not torch.isfinite(out.loss):
        _fail(report, f"loss is not finite: {out.loss}")
    if set(out.predictions) != set(item_tasks):
        _fail(report, f"predictions for {sorted(out.predictions)}, expected {sorted(set(item_tasks))}")
    task_loss = sum(
        float(model.heads[t].loss_weight if hasattr(model.heads[t], "loss_weight") else 1.0) * out.losses[f"task/{t}"]
        for t in set(item_tasks)
    )
    aux = {k: v for k, v in out.losses.items() if k.startswith("aux/")}
    _grads(report, model, task_loss, "the task losses", _aux_sum(aux))
    again = compose(model.spec, registry=registry)
    sa, sb = initial, again.state_dict()
    if list(sa) != list(sb) or any(sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]) for k in sa):
        _fail(report, "compose(model.spec) does not rebuild the same parameters")
    report.ok("compose(model.spec) rebuilds identical parameters")
    return report
