"""What a registry holds: declared kinds, components (and component presets) and model presets.

A *component preset* is a registered name for another component of the same kind with other
default params: ``top_p`` is ``scored`` with a top-p selector. Its params are defaults beneath the
user's, merged per top-level param (a user's ``selector`` replaces the preset's wholesale, as a
class default would), and a spec records the name the user gave with every param resolved. A
preset may build on another preset; the registry links each to its base once every plugin has
registered (:func:`link_presets`), so an entry in use knows its class (``target``) and all its
defaults. An *alias* (``alias_of``) is a deprecated old name: it builds the other component, warns,
is recorded under the new name, and reads its old param names as the new ones (``renamed``).

Nothing here imports torch: components are import strings, loaded only when built or described.
"""

from __future__ import annotations

import copy
import importlib
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

from audiomoe.core.errors import AudioMoEError, did_you_mean
from audiomoe.core.names import Origin, field_default

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_BASE_RE = re.compile(r"^([A-Za-z0-9_.\-]+:)?[A-Za-z0-9_.\-]+$")
_PARAM_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)?$")


@dataclass(frozen=True)
class KindEntry:
    """A declared kind: ``plugin`` says the kind exists and may give its ``default`` component."""

    kind: str
    summary: str
    plugin: str
    default: Optional[str] = None


@dataclass(frozen=True)
class ComponentEntry:
    """One registration: ``kind/name`` implemented by ``target``, provided by ``plugin``.

    A component preset names its base in ``preset_of`` (an alias: ``alias_of``); once linked,
    ``target`` is its class's and ``params`` holds its defaults with its bases' beneath them.
    """

    kind: str
    name: str
    target: str
    summary: str
    plugin: str
    version: str = ""
    preset_of: str = ""
    alias_of: str = ""
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    renamed: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: preset params -> the plugin that wrote each (its names mean that plugin's components)
    param_authors: Mapping[str, str] = field(default_factory=dict, hash=False, repr=False)
    owner: str = ""  # the plugin of the class a preset builds ("": this entry's plugin)
    canonical: str = ""  # an alias: ``plugin:name`` of what it stands for
    problem: str = ""  # a preset whose base cannot be used: why (raised when it is used)

    @property
    def qualified_name(self) -> str:
        """``plugin:name``, unique even when two plugins register the same name."""
        return f"{self.plugin}:{self.name}"

    @property
    def class_plugin(self) -> str:
        """The plugin whose class this builds: the author of the Params defaults."""
        return self.owner or self.plugin

    def load(self) -> type:
        """Import and return the class behind ``target`` (this may import torch)."""
        if self.problem:
            raise AudioMoEError(self.problem)
        module_name, _, attr = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            hint = (
                f"Check the class name after ':' in the target '{self.target}'"
                if isinstance(exc, AttributeError)
                else "Check that the plugin is installed with its dependencies"
            )
            raise AudioMoEError(
                f"{self.kind} '{self.name}' from plugin '{self.plugin}' {self.version}: cannot import "
                f"'{self.target}': {type(exc).__name__}: {exc}. {hint}."
            ) from exc
        return obj

    def default_of(self, key: str, params_cls: Any) -> Any:
        """The default of param ``key``: this preset's, else the Params field's (None: no such field)."""
        if key in self.params:
            return copy.deepcopy(self.params[key])
        f = getattr(params_cls, "model_fields", {}).get(key)
        return None if f is None else field_default(f)

    def origin_of(self, origin: Origin, key: str, params_cls: Any) -> Origin:
        """Who wrote param ``key`` (core/names.py): the spec's author, else this preset's, else the class's plugin."""
        if key in self.params and not (isinstance(origin.raw, Mapping) and key in origin.raw):
            return Origin(self.param_authors.get(key, self.plugin), self.params[key])
        return origin.slot(key, self.class_plugin, self.default_of(key, params_cls))

    def params_over_defaults(self, raw: Mapping[str, Any], params_cls: Any) -> dict[str, Any]:
        """``raw`` over this preset's defaults, per top-level param; an alias's old param names read as the new ones."""
        out = copy.deepcopy(dict(self.params))
        out.update({k: v for k, v in raw.items() if k not in self.renamed})
        for old, new in self.renamed.items():
            slot, _, key = new.partition(".")
            if old not in raw or (slot in raw and not key):
                continue  # the new name given too: it wins
            if not key:
                out[slot] = raw[old]
                continue
            node = _as_spec(out.get(slot) if slot in out else self.default_of(slot, params_cls))
            if not (slot in raw and key in node["params"]):
                node["params"][key] = raw[old]
            out[slot] = node
        return out

    def deprecation(self, raw: Mapping[str, Any]) -> str:
        """The warning for using this alias with params ``raw``."""
        new = self.canonical.rpartition(":")[2]
        msg = (
            f"{self.kind} '{self.name}' is deprecated: it is '{new}' (the same component), the name specs record "
            "from now on; the old name goes in the next release"
        )
        used = [f"'{was}' as '{now}'" for was, now in self.renamed.items() if was in raw]
        return msg + (f"; its old params are read as the new ones: {', '.join(used)}" if used else "")


def _as_spec(value: Any) -> dict[str, Any]:
    """A slot's value as a ``{name, params}`` mapping (a bare name, a mapping or a ComponentSpec)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, Mapping):
        return {"name": value.get("name"), "params": dict(value.get("params") or {})}
    return {"name": value, "params": {}}


@dataclass(frozen=True)
class PresetEntry:
    """A named model spec (a recipe), provided by ``plugin``."""

    name: str
    spec: Mapping[str, Any]
    summary: str
    plugin: str
    version: str = ""


def check_registration(kind: Any, name: Any, target: Any, known: Sequence[str], base: Any = None) -> None:
    """Refuse a registration with an undeclared kind, a bad name, or a target that is not an import string.

    ``base``: the ``preset_of`` / ``alias_of`` name of a component preset, which has no target.
    """
    if not isinstance(kind, str) or kind not in known:
        # A typo must not create a new kind that nothing uses: new kinds are declared.
        raise ValueError(
            f"unknown kind {kind!r}.{did_you_mean(str(kind), known)} Known kinds: {', '.join(known)}. "
            "A plugin adding a kind declares it in audiomoe_register_kinds"
        )
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r} must match {NAME_RE.pattern} (no ':' - that qualifies by plugin)")
    if base is not None:
        if target is not None:
            raise ValueError(f"{kind} '{name}': a component preset names its base (preset_of / alias_of), not a target")
        if not isinstance(base, str) or not _BASE_RE.match(base):
            raise ValueError(f"{kind} '{name}': preset_of / alias_of {base!r} must be a {kind} name (or plugin:name)")
        return
    if not isinstance(target, str) or not TARGET_RE.match(target):
        raise ValueError(
            f"{kind} '{name}': target {target!r} must be an import string 'package.module:ClassName' "
            "(register strings, not classes, so listing stays fast)"
        )


def check_preset_params(kind: str, name: str, params: Any, renamed: Any, how: Optional[str]) -> None:
    """Refuse params outside a preset, renames outside an alias, and either one of the wrong shape.

    ``how``: ``"preset"`` (``preset_of``), ``"alias"`` (``alias_of``) or None (a class with a target).
    """
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise TypeError(f"{kind} '{name}': params must be a mapping of param names, got {type(params).__name__}")
    if not isinstance(renamed, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and _PARAM_RE.match(v) for k, v in renamed.items()
    ):
        raise TypeError(
            f"{kind} '{name}': renamed_params must map old param names to new ones ('param' or 'slot.param')"
        )
    if params and how != "preset":
        raise ValueError(f"{kind} '{name}': only a preset (preset_of) has params; an alias is the other name's exactly")
    if renamed and how != "alias":
        raise ValueError(f"{kind} '{name}': renamed_params belong to an alias (alias_of)")


def link_presets(
    table: Mapping[tuple[str, str], list[ComponentEntry]], select: Callable[[str, str, str], ComponentEntry]
) -> dict[tuple[str, str], list[ComponentEntry]]:
    """``table`` with every component preset linked to its base: its class's target and all its defaults.

    ``select(kind, name, prefer)`` finds a registered entry (raising :class:`AudioMoEError`); a
    preset's base is looked up preferring the preset's own plugin. A preset whose base is missing,
    ambiguous or itself broken keeps a ``problem``, raised when it is used (listing still works).
    """
    done: dict[int, ComponentEntry] = {}

    def link(e: ComponentEntry, chain: tuple[int, ...]) -> ComponentEntry:
        base_name = e.preset_of or e.alias_of
        if not base_name or id(e) in done:
            return done.get(id(e), e)
        try:
            if id(e) in chain:
                raise AudioMoEError("the presets form a loop")
            base = link(select(e.kind, base_name, e.plugin), chain + (id(e),))
            if base.problem:
                raise AudioMoEError(base.problem)
        except AudioMoEError as exc:
            how = "an alias of" if e.alias_of else "a preset of"
            out = replace(
                e,
                problem=f"{e.kind} '{e.name}' (plugin '{e.plugin}') is {how} '{base_name}', which cannot be used: {exc}",
            )
        else:
            canonical = (base.canonical or base.qualified_name) if e.alias_of else ""
            authors = {**base.param_authors, **{k: e.plugin for k in e.params}}
            params = {**base.params, **e.params}
            out = replace(
                e,
                target=base.target,
                params=params,
                param_authors=authors,
                owner=base.class_plugin,
                canonical=canonical,
            )
        done[id(e)] = out
        return out

    return {key: [link(e, ()) for e in entries] for key, entries in table.items()}
