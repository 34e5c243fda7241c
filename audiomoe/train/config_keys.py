"""Dotted ``--set`` keys into a raw config mapping, and pydantic errors as config problems (recipes use both).

Kept apart from the recipe schema (:mod:`audiomoe.train.recipe`): plain functions over mappings.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from pydantic import ValidationError

from ..core.errors import ConfigProblem


def problems_of(exc: ValidationError) -> list[ConfigProblem]:
    """Every error of a pydantic validation as a :class:`ConfigProblem` under its dotted key."""
    out = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        out.append(ConfigProblem(key, msg, err.get("input"), "input" in err and err["type"] not in ("missing", "value_error")))
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
