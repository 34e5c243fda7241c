"""Whose names: which plugin's component an unqualified name in a spec means.

Two plugins may register the same name (a third-party ``router/top_p`` next to the built-in one).
That must not change what anybody else's preset builds, so every name is resolved for its author:

- a name written in a preset means that preset's plugin's component first;
- a name written in a component's ``Params`` default means that component's plugin's first;
- a name typed by the user (an override, a config file, a mapping) has no author to prefer: if
  plugins clash on it, it is an error naming the qualified choices (``builtin:top_p``).

An author only has a say while its own value is in place: an override (or a config's key) that
puts another name there makes it the user's. The composer tracks this with an :class:`Origin`
(the author and its own version of the subtree) and the set of paths overrides assigned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class Origin:
    """The author of a spec subtree: ``plugin`` (``None``: the user) and its own version ``raw``."""

    plugin: Optional[str] = None
    raw: Any = None

    def slot(self, key: str, owner: Optional[str], default: Any) -> "Origin":
        """The author of params field ``key``: whoever wrote it here, else the owner's Params default."""
        if isinstance(self.raw, Mapping) and key in self.raw:
            return Origin(self.plugin, self.raw[key])
        return Origin(owner, default)

    def item(self, key: Any) -> "Origin":
        """The author of one entry of a list / dict slot; an entry it does not have is the user's."""
        raw = self.raw
        if isinstance(raw, Mapping) and key in raw:
            return Origin(self.plugin, raw[key])
        if isinstance(raw, (list, tuple)) and isinstance(key, int) and 0 <= key < len(raw):
            return Origin(self.plugin, raw[key])
        return USER


USER = Origin()
#: Put in an author's version where a config file wrote a value: equal to no name, so it is the user's.
USER_WROTE: Any = type("UserWrote", (), {"__repr__": lambda self: "<written by the user>"})()


def name_of(value: Any) -> Any:
    """The component name in a spec value: ``"top_p"``, ``{name: top_p}`` or a ComponentSpec."""
    if value is USER_WROTE:
        return value
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return value.get("name")
    return getattr(value, "name", None)


def _params_of(value: Any) -> Any:
    if isinstance(value, Mapping):
        return value.get("params") or {}
    return getattr(value, "params", None) or {}


def field_default(field: Any) -> Any:
    """The default value of a pydantic field (calling its ``default_factory``)."""
    return field.default_factory() if field.default_factory is not None else field.default


def is_typed(path: str, typed: "set[str] | frozenset[str]") -> bool:
    """Whether an override assigned the component at ``path`` (or the whole list / dict holding it)."""
    return path in typed or f"{path.rpartition('.')[0]}.*" in typed


def mark_typed(typed: set[str], path: str, container: bool = False) -> None:
    """Record that an override assigned ``path``; whatever was typed under it is replaced."""
    for p in [p for p in typed if p == path or p.startswith(path + ".")]:
        typed.discard(p)
    typed.add(f"{path}.*" if container else path)


def author(
    origin: Origin, name: Optional[str], path: str, typed: "set[str] | frozenset[str]"
) -> tuple[Optional[str], Origin]:
    """``(plugin to prefer for name, origin of the component's params)`` at ``path``.

    The author keeps its say only while the name is still its own: typed over, or changed by a
    config file's key, the name is the user's.
    """
    if is_typed(path, typed) or name_of(origin.raw) != name:
        return None, USER
    return origin.plugin, Origin(origin.plugin, _params_of(origin.raw))


def source_origin(source: Any, registry: Any, _depth: int = 0) -> Origin:
    """The author of a spec source: a preset's plugin (also under a config file's ``preset:``), else the user."""
    if not isinstance(source, (str, os.PathLike)) or _depth > 16:
        return USER
    text = os.fspath(source)
    if text.endswith((".yaml", ".yml")) or os.path.splitext(text)[1] and os.path.exists(text):
        from audiomoe.core.safe_yaml import load_yaml_file  # the composer already read it: this cannot fail now

        try:
            data = load_yaml_file(text)
        except Exception:  # noqa: BLE001 - resolution reports config problems, not this helper
            return USER
        if isinstance(data, Mapping) and isinstance(data.get("preset"), str):
            base = source_origin(data["preset"], registry, _depth + 1)
            rest = {k: v for k, v in data.items() if k != "preset"}
            return Origin(base.plugin, _overlay(base.raw, rest)) if base.plugin else USER
        return USER
    if not registry.has_preset(text):
        return USER
    try:
        preset = registry.get_preset(text)
    except Exception:  # noqa: BLE001 - an ambiguous preset name was already reported
        return USER
    return Origin(preset.plugin, preset.spec)


def _overlay(author_raw: Any, user: Mapping[str, Any]) -> Any:
    """The author's version with every value the user's config file writes replaced by USER_WROTE.

    Done on the raw trees, so no component needs importing: a slot the file names (``router: top_p``
    or ``router: {name: top_p}``) then no longer matches the author's name, whatever it is.
    """
    out = dict(author_raw) if isinstance(author_raw, Mapping) else {}
    for key, value in user.items():
        out[key] = _overlay(out.get(key), value) if isinstance(value, Mapping) else USER_WROTE
    return out


def recorded_name(registry: Any, kind: str, given: Optional[str], entry: Any) -> str:
    """The name the resolved spec records: qualified when plugins clash, so it recomposes as is."""
    if given and ":" in given:
        return given
    if len(registry.providers(kind, entry.name)) > 1:
        return entry.qualified_name
    return entry.name
