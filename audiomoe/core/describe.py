"""Describe a registered component: its params (type, default, limits, description) and an example.

A component preset (``top_p``: ``scored`` with other defaults) is described as its class with the
preset's defaults in the table and the example, and says whose preset it is.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import yaml
from pydantic.fields import FieldInfo

from audiomoe.core.registry import RESERVED_KINDS, Registry, get_registry
from audiomoe.core.specs import slot_fields

_LIMITS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "min length", "max_length": "max length"}


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    return text.replace("typing.", "").replace("audiomoe.core.specs.", "")


def _limits(field: FieldInfo) -> list[str]:
    out = []
    for m in field.metadata:
        for attr, sym in _LIMITS.items():
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return out


def _default(field: FieldInfo) -> Any:
    value = field.get_default(call_default_factory=True)
    return _plain(value)


def _plain(value: Any) -> Any:
    """Models inside lists and mappings too (a mixture's default weak list) become plain YAML-able data."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def describe_preset(name: str, *, registry: Optional[Registry] = None) -> dict[str, Any]:
    """Return ``{kind: "preset", name, use_as, plugin, version, summary, spec}`` for a preset.

    ``name`` may be qualified (``plugin:name``); ``use_as`` is the name to type (qualified when two
    plugins register it).

    ``spec`` is the preset's model spec as registered (what ``audiomoe validate NAME`` resolves);
    nothing is imported.
    """
    reg = registry or get_registry()
    entry = reg.get_preset(name)
    clash = len(reg.list_presets(entry.name)) > 1
    return {
        "kind": "preset",
        "name": entry.name,
        "use_as": f"{entry.plugin}:{entry.name}" if clash else entry.name,
        "plugin": entry.plugin,
        "version": entry.version,
        "summary": entry.summary,
        "spec": dict(entry.spec),
    }


def describe(kind: str, name: str, *, registry: Optional[Registry] = None) -> dict[str, Any]:
    """Return ``{kind, name, plugin, version, target, summary, doc, preset_of, alias_of, params, example}`` for a component.

    ``params`` is a list of ``{name, type, default, limits, description, slot}``; ``example`` is a
    YAML snippet using the component with its defaults. Imports the component (and torch).
    ``kind="preset"`` describes a preset instead (:func:`describe_preset`). An unknown kind is an
    error with a "did you mean"; a name two plugins register must be qualified (``plugin:name``).
    """
    reg = registry or get_registry()
    if kind in RESERVED_KINDS:
        return describe_preset(name, registry=reg)
    entry = reg.get_component(kind, name)
    cls: Any = entry.load()
    params_cls = cls.Params
    slots = slot_fields(params_cls)
    rows = []
    for fname, field in params_cls.model_fields.items():
        rows.append(
            {
                "name": fname,
                "type": f"{slots[fname][0]} component" if fname in slots else _type_name(field.annotation),
                "default": _plain(entry.params[fname]) if fname in entry.params else _default(field),
                "limits": _limits(field),
                "description": field.description or "",
                "slot": slots.get(fname, (None,))[0],
            }
        )
    defaults = {r["name"]: r["default"] for r in rows}
    use_as = entry.canonical.rpartition(":")[2] if entry.alias_of else entry.name
    example = yaml.safe_dump({kind: {"name": use_as, "params": defaults}}, sort_keys=False).rstrip()
    injected = [
        p
        for p in list(inspect.signature(cls.__init__).parameters)[2:]
        if p not in slots and p not in ("args", "kwargs")
    ]
    info = {
        "kind": kind,
        "name": entry.name,
        "plugin": entry.plugin,
        "version": entry.version,
        "target": entry.target,
        "summary": entry.summary,
        "doc": _preset_line(entry) + inspect.cleandoc(inspect.getmodule(cls).__doc__ or cls.__doc__ or ""),
        "preset_of": entry.preset_of or None,
        "alias_of": entry.alias_of or None,
        "params": rows,
        "injected": injected,
        "example": example,
    }
    if kind == "expert":
        info["grouped"] = _grouped_form(cls)
    from audiomoe.core.interfaces import BASES  # the class is imported already, so torch is too

    base = BASES.get(kind)
    problems = (
        [f"does not subclass audiomoe.{base.__name__}: models refuse it"]
        if base is not None and not issubclass(cls, base)
        else []
    )
    try:  # a default that breaks its own field's limits (Params validate their defaults), a preset's too
        params_cls.model_validate(entry.params_over_defaults({}, params_cls))
    except Exception as exc:  # noqa: BLE001 - reported, not raised: describe shows what is wrong
        problems.append(f"its defaults do not validate: {' '.join(str(exc).split())[:300]}")
    info["problems"] = problems
    return info


def _preset_line(entry: Any) -> str:
    """What a component preset or alias is, for the head of its ``doc`` (empty for a component with its own class)."""
    if entry.alias_of:
        renamed = ", ".join(f"{old} -> {new}" for old, new in entry.renamed.items())
        return (
            f"Deprecated alias of {entry.kind} '{entry.alias_of}' (specs record that name)"
            + (f"; old params read as: {renamed}" if renamed else "")
            + ".\n\n"
        )
    if entry.preset_of:
        own = yaml.safe_dump(_plain(dict(entry.params)), default_flow_style=True, sort_keys=False, width=10**6).strip()
        return f"Preset of {entry.kind} '{entry.preset_of}': the same component with the defaults {own}.\n\n"
    return ""


def _grouped_form(cls: type) -> str:
    """How an MoE layer runs experts of this kind: a grouped module (stacked weights) or a per-expert loop."""
    from audiomoe.core.interfaces import Expert

    grouped = getattr(cls, "grouped", None)
    if grouped is None or getattr(grouped, "__func__", None) is getattr(Expert.grouped, "__func__", None):
        return "no: an MoE layer runs these experts with a per-expert loop (dispatch 'loop')"
    return "yes: an MoE layer holds them as one stacked-weight module (fused / grouped_mm dispatch)"
