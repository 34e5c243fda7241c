"""Dotted ``--set`` keys into a raw config mapping, and pydantic errors as config problems (recipes use both).

Kept apart from the recipe schema (:mod:`audiomoe.train.recipe`): plain functions over mappings.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from pydantic import ValidationError

from audiomoe.core.errors import ConfigProblem, did_you_mean


def _fields_at(schema: Any, loc: tuple) -> list[str]:
    """The field names of the pydantic model reached from ``schema`` along ``loc`` (list indices skipped); [] if none."""
    from typing import get_args

    node = schema
    for part in loc:
        if isinstance(part, int) or node is None:
            continue
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            return []
        kinds = [
            field.annotation,
            *get_args(field.annotation),
            *(a for g in get_args(field.annotation) for a in get_args(g)),
        ]
        node = next((k for k in kinds if isinstance(k, type) and hasattr(k, "model_fields")), None)
    return list(getattr(node, "model_fields", {}))


def problems_of(exc: ValidationError, schema: Any = None) -> list[ConfigProblem]:
    """Every error of a pydantic validation as a :class:`ConfigProblem` under its dotted key (``schema``: suggest keys)."""
    out = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and schema is not None:
            known = _fields_at(schema, tuple(err["loc"][:-1]))
            msg = (
                f"unknown key '{err['loc'][-1]}'.{did_you_mean(str(err['loc'][-1]), known)} Keys here: {', '.join(known)}"
                if known
                else msg
            )
        out.append(
            ConfigProblem(key, msg, err.get("input"), "input" in err and err["type"] not in ("missing", "value_error"))
        )
    return out


def set_key(raw: dict[str, Any], key: str, value: Any) -> Optional[str]:
    """Set dotted ``key`` in ``raw`` (list items by index or by stage name); return a problem or None."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            names = [s.get("name") if isinstance(s, Mapping) else None for s in node]
            idx = int(part) if part.isdigit() else (names.index(part) if part in names else None)
            if idx is None or idx >= len(node):
                return f"no stage '{part}' (stages: {', '.join(map(str, names))})"
            if last:
                node[idx] = value
            node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            return f"'{'.'.join(parts[:i])}' is not a section"
    return None
