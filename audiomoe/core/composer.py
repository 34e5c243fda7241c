"""The composer: preset / spec / YAML + overrides -> a validated, resolved spec -> a model.

Three steps, each usable alone:

1. :func:`load_spec` turns a preset name, a YAML path, a mapping or a :class:`ModelSpec` into the
   raw mapping form; :func:`apply_overrides` applies ``key=value`` overrides to it. A dotted key
   walks component params without writing ``params`` (``backbone.moe.router.k=2``). Assigning a name
   to a component key swaps the component and *resets its params* to the new one's defaults.
2. :func:`resolve` validates the whole tree against each component's ``Params`` and reports every
   problem at once (:class:`ConfigError`), each with its dotted key. A component preset's defaults
   lie beneath the params given (:mod:`.entries`); a deprecated alias warns and records the new name.
3. :func:`build_model` builds the parts bottom-up, injecting sizes the composer knows and
   :class:`Builder` callables for child components, under a fixed seed.

The resolved spec (every default filled in) is stored on the model as ``model.spec``; composing
from it rebuilds the same architecture and, with the same seed, the same parameters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from pydantic import BaseModel, ValidationError

from audiomoe.core.builder import Builder, ComponentInfo, builders  # noqa: F401 - ComponentInfo is public here too
from audiomoe.core.errors import AudioMoEError, ConfigError, ConfigProblem, did_you_mean
from audiomoe.core.limits import MAX_PARAMETERS
from audiomoe.core.names import USER, Origin, author, field_default, recorded_name, source_origin
from audiomoe.core.overrides import SpecSource, apply_overrides, load_spec, parse_override  # noqa: F401 - parse_override is public here too
from audiomoe.core.registry import ComponentEntry, Registry, get_registry
from audiomoe.core.specs import ComponentSpec, ModelSpec, Params, slot_fields


@dataclass
class Node:
    """A resolved component: its registry entry, class, validated params and resolved children."""

    kind: str
    name: str
    entry: ComponentEntry
    cls: type
    params: Params
    children: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec of this component: ``{name, params}`` with every default filled in."""
        return {"name": self.name, "params": _params_dict(self.params, self.children)}


def _params_dict(params: BaseModel, children: Mapping[str, Any]) -> dict[str, Any]:
    out = params.model_dump(mode="json", exclude=set(children))
    for slot, child in children.items():
        if isinstance(child, Node):
            out[slot] = child.to_dict()
        elif isinstance(child, list):
            out[slot] = [c.to_dict() for c in child]
        elif isinstance(child, dict):
            out[slot] = {k: c.to_dict() for k, c in child.items()}
        else:
            out[slot] = None
    return out


@dataclass
class ResolvedSpec:
    """The validated model spec: root params (a :class:`ModelSpec`) and resolved children."""

    params: ModelSpec
    children: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The whole resolved spec as a plain mapping (what ``audiomoe validate`` prints)."""
        return _params_dict(self.params, self.children)


def _join(path: str, *parts: Any) -> str:
    out = path
    for p in parts:
        out = f"{out}.{p}" if out else str(p)
    return out


def _validation_problems(exc: ValidationError, path: str, params_cls: type[BaseModel]) -> list[ConfigProblem]:
    out = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        key = _join(path, *loc)
        if err["type"] == "extra_forbidden":
            bad = loc[-1] if loc else "?"
            fields = list(params_cls.model_fields)
            msg = f"unknown key '{bad}'.{did_you_mean(bad, fields)} Valid keys: {', '.join(fields) or '(none)'}"
        else:
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
        has_value = err["type"] != "missing"
        out.append(ConfigProblem(key or "<root>", msg, err.get("input"), has_value))
    return out


def _resolve_params(
    params_cls: type[BaseModel],
    raw: Any,
    path: str,
    registry: Registry,
    problems: list[ConfigProblem],
    origin: Origin = USER,
    entry: Optional[ComponentEntry] = None,
    typed: frozenset[str] = frozenset(),
) -> tuple[Optional[BaseModel], dict[str, Any]]:
    # origin: who wrote ``raw``; entry: the component these params belong to, whose plugin (or
    # preset) wrote the defaults; typed: paths whose names overrides assigned (core/names.py).
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(ConfigProblem(path or "<root>", "must be a mapping of params", raw, True))
        return None, {}
    validated: Optional[BaseModel] = None
    try:
        validated = params_cls.model_validate(dict(raw))
    except ValidationError as exc:
        problems.extend(_validation_problems(exc, path, params_cls))

    children: dict[str, Any] = {}
    for slot, (kind, how) in slot_fields(params_cls).items():
        if validated is not None:
            value = getattr(validated, slot)
        elif slot in raw:
            value = raw[slot]
        else:
            value = field_default(params_cls.model_fields[slot])
        slot_path = _join(path, slot)
        f = params_cls.model_fields[slot]
        so = origin.slot(slot, None, field_default(f)) if entry is None else entry.origin_of(origin, slot, params_cls)
        if how == "one":
            children[slot] = (
                None if value is None else _resolve_component(kind, value, slot_path, registry, problems, so, typed)
            )
        elif how == "list":
            items = value if isinstance(value, list) else []
            children[slot] = [
                _resolve_component(kind, v, _join(slot_path, i), registry, problems, so.item(i), typed)
                for i, v in enumerate(items)
            ]
        else:
            named = value if isinstance(value, Mapping) else {}
            children[slot] = {
                k: _resolve_component(kind, v, _join(slot_path, k), registry, problems, so.item(k), typed)
                for k, v in named.items()
            }
    return validated, children


def _resolve_component(
    kind: str,
    value: Any,
    path: str,
    registry: Registry,
    problems: list[ConfigProblem],
    origin: Origin = USER,
    typed: frozenset[str] = frozenset(),
) -> Optional[Node]:
    if isinstance(value, ComponentSpec):
        spec = value
    else:
        try:
            spec = ComponentSpec.model_validate(value)
        except ValidationError as exc:
            problems.extend(_validation_problems(exc, path, ComponentSpec))
            return None
    prefer, params_origin = author(origin, spec.name, path, typed)
    try:
        entry = registry.get_component(kind, spec.name, prefer=prefer)
    except AudioMoEError as exc:
        problems.append(ConfigProblem(path, str(exc), spec.name, True))
        return None
    try:
        cls = entry.load()
    except AudioMoEError as exc:
        problems.append(ConfigProblem(path, str(exc)))
        return None
    from audiomoe.core.interfaces import BASES  # torch: only once something is actually resolved

    base = BASES.get(kind)
    if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
        problems.append(
            ConfigProblem(
                path,
                f"{entry.target} (plugin '{entry.plugin}') is registered as a {kind} but does not subclass audiomoe.{base.__name__}",
            )
        )
        return None
    params_cls = getattr(cls, "Params", None)
    if not (isinstance(params_cls, type) and issubclass(params_cls, BaseModel)):
        problems.append(ConfigProblem(path, f"{entry.target} has no pydantic Params class"))
        return None
    if entry.alias_of:
        warnings.warn(entry.deprecation(spec.params), DeprecationWarning, stacklevel=2)
    raw = entry.params_over_defaults(spec.params, params_cls)  # a component preset's defaults beneath
    validated, children = _resolve_params(params_cls, raw, path, registry, problems, params_origin, entry, typed)
    if validated is None:
        return None
    # an alias is recorded under the name it stands for, so the spec outlives the old name
    name = (
        recorded_name(registry, kind, spec.name, entry)
        if not entry.alias_of
        else recorded_name(registry, kind, None, registry.get_component(kind, entry.canonical))
    )
    return Node(kind, name, entry, cls, validated, children, path)  # type: ignore[arg-type]  # validated is set on every path that reaches here


def resolve(
    source: SpecSource,
    overrides: Iterable[str] = (),
    registry: Optional[Registry] = None,
    *,
    authored: Iterable[str] = (),
) -> ResolvedSpec:
    """Validate ``source`` + ``overrides``; raise :class:`ConfigError` listing every problem.

    ``authored``: overrides by the preset's own plugin (applied first; their names mean its components, as its own do).
    """
    registry = registry or get_registry()
    raw, label = load_spec(source, registry)
    origin, typed = source_origin(source, registry), set[str]()
    problems: list[ConfigProblem] = []
    for text in authored:  # one at a time: each sees the author's version with the ones before it
        raw, found = apply_overrides(raw, [text], registry, origin=origin, typed=set())
        problems += found
        origin = Origin(origin.plugin, raw) if origin.plugin else origin
    raw, found = apply_overrides(raw, list(overrides), registry, origin=origin, typed=typed)
    problems += found
    validated, children = _resolve_params(ModelSpec, raw, "", registry, problems, origin, None, frozenset(typed))
    if problems or validated is None:
        raise ConfigError(problems, source=label)
    return ResolvedSpec(validated, children)  # type: ignore[arg-type]  # validated is set on every path that reaches here


# -- step 3: build (one component: core/builder.py) ---------------------------------------------


def component_builder(kind: str, spec: Any, registry: Optional[Registry] = None) -> Builder:
    """A :class:`Builder` for one registered component, from a name or ``{name, params}``.

    What the composer injects into a parent, for code that builds a part on its own (tests,
    benchmarks, upcycling). Raises :class:`ConfigError` listing every problem of ``spec``.
    """
    problems: list[ConfigProblem] = []
    node = _resolve_component(kind, spec, kind, registry or get_registry(), problems)
    if problems or node is None:
        raise ConfigError(problems, source=f"{kind} {spec!r}")
    return Builder(node)


#: The model class, named by import string as the registry names components: core imports nothing above it.
MODEL_TARGET = "audiomoe.model:AudioModel"


def build_model(resolved: ResolvedSpec) -> Any:
    """Build an :class:`audiomoe.model.AudioModel` from a resolved spec, seeded by ``spec.seed``."""
    import importlib

    import torch

    module, _, name = MODEL_TARGET.partition(":")
    AudioModel = getattr(importlib.import_module(module), name)
    children = {slot: builders(child) for slot, child in resolved.children.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(resolved.params.seed)
        model = AudioModel(resolved.params.model_copy(deep=True), **children)
    model.spec = resolved.to_dict()
    return model


def compose(
    source: SpecSource,
    overrides: Iterable[str] = (),
    *,
    registry: Optional[Registry] = None,
) -> Any:
    """Build a model from a preset name, a YAML path, a mapping or a :class:`ModelSpec`.

    ``overrides`` are ``key=value`` strings applied in order (``backbone.moe.router=top_p``,
    ``backbone.moe.router.k=2``). Raises :class:`ConfigError` listing every problem at once.

    >>> model = audiomoe.compose("tiny-moe-cls", overrides=["backbone.moe.num_experts=8"])
    >>> model.spec["backbone"]["params"]["num_experts"]
    8
    """
    return build_model(resolve(source, overrides, registry))


def validate(
    source: SpecSource, overrides: Iterable[str] = (), *, registry: Optional[Registry] = None
) -> tuple[ResolvedSpec, int]:
    """Check that ``source`` + ``overrides`` composes; return the resolved spec and its parameter count.

    Beyond :func:`resolve` (types and limits of every param), the model is built on PyTorch's
    ``meta`` device, so every constructor check runs (``k`` larger than the number of experts, a
    missing pretrained directory, ...) while no parameter memory is allocated. A model of more
    than ``MAX_PARAMETERS`` parameters is refused here, before anything would allocate it.
    """
    resolved = resolve(source, overrides, registry)
    return resolved, check_size(build_meta(resolved))


def build_meta(resolved: ResolvedSpec) -> Any:
    """:func:`build_model` on PyTorch's ``meta`` device: every constructor check, no parameter memory."""
    import torch

    with torch.device("meta"):
        return build_model(resolved)


def check_size(model: Any) -> int:
    """The parameter count of ``model`` (e.g. a meta model); over ``MAX_PARAMETERS`` is an error."""
    total = sum(p.numel() for p in model.parameters())
    if total > MAX_PARAMETERS:
        raise AudioMoEError(
            f"this spec builds {total:,} parameters ({total * 4 / 2**30:,.0f} GiB in float32), over the limit of "
            f"{MAX_PARAMETERS:,}; check the sizes (d_model, d_ff, num_experts, num_layers)"
        )
    return total


def count_parameters(model: Any) -> tuple[int, float]:
    """``(total, active per token)``. Parts with ``num_active_parameters()`` report their own active count."""
    total = sum(p.numel() for p in model.parameters())

    def active(module: Any) -> float:
        fn = getattr(module, "num_active_parameters", None)
        if callable(fn):
            val = fn()
            if val is not None:
                return float(val)
        own = sum(p.numel() for p in module.parameters(recurse=False))
        return own + sum(active(c) for c in module.children())

    return total, active(model)
