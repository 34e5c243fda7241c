"""Describe a registered component: its params (type, default, limits, description) and an example."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import yaml
from pydantic.fields import FieldInfo

from .registry import Registry, get_registry
from .specs import slot_fields

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
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_defaults=True)
    return value


def describe(kind: str, name: str, *, registry: Optional[Registry] = None) -> dict[str, Any]:
    """Return ``{kind, name, plugin, version, target, summary, doc, params, example}`` for a component.

    ``params`` is a list of ``{name, type, default, limits, description, slot}``; ``example`` is a
    YAML snippet using the component with its defaults. Imports the component (and torch).
    """
    reg = registry or get_registry()
    entry = reg.get_component(kind, name)
    cls = entry.load()
    params_cls = cls.Params
    slots = slot_fields(params_cls)
    rows = []
    for fname, field in params_cls.model_fields.items():
        rows.append(
            {
                "name": fname,
                "type": f"{slots[fname][0]} component" if fname in slots else _type_name(field.annotation),
                "default": _default(field),
                "limits": _limits(field),
                "description": field.description or "",
                "slot": slots.get(fname, (None,))[0],
            }
        )
    defaults = {r["name"]: r["default"] for r in rows}
    example = yaml.safe_dump({kind: {"name": entry.name, "params": defaults}}, sort_keys=False).rstrip()
    injected = [
        p for p in list(inspect.signature(cls.__init__).parameters)[2:] if p not in slots and p not in ("args", "kwargs")
    ]
    return {
        "kind": kind,
        "name": entry.name,
        "plugin": entry.plugin,
        "version": entry.version,
        "target": entry.target,
        "summary": entry.summary,
        "doc": inspect.cleandoc(inspect.getmodule(cls).__doc__ or cls.__doc__ or ""),
        "params": rows,
        "injected": injected,
        "example": example,
    }
