"""The component and preset registry, filled by pluggy plugins.

Loading rules (from the plugin-design notes: llm #1280, pluggy #705, timm #1694):

- Entry points of group ``audiomoe`` are loaded one at a time, sorted by distribution and
  entry-point name. A plugin that fails to import or to register is skipped with a warning naming
  it and its version; ``AUDIOMOE_STRICT_PLUGINS=1`` (or ``strict=True``) raises instead.
- ``AUDIOMOE_DISABLE_PLUGINS=a,b`` disables plugins by entry-point or distribution name.
- Each plugin's hook implementation is called on its own with a ``register`` callback bound to
  that plugin, so every registration knows its provider and results never depend on pluggy's
  last-registered-first call order. A plugin whose hook raises contributes nothing.
- The same name from two plugins is recorded; it is an error only when the name is used, and the
  message names both providers and how to pick one (``plugin:name``).

Nothing here imports torch: components are import strings, loaded only when built or described.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata as importlib_metadata
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import pluggy
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import hookspecs
from .errors import (
    AmbiguousComponentError,
    AudioMoEError,
    PluginLoadError,
    UnknownComponentError,
    did_you_mean,
)

STRICT_ENV = "AUDIOMOE_STRICT_PLUGINS"
DISABLE_ENV = "AUDIOMOE_DISABLE_PLUGINS"
BUILTIN_PLUGIN = "builtin"

#: Kinds with a base class in :mod:`audiomoe.core.interfaces`; a plugin may add other kinds.
KNOWN_KINDS = ("encoder", "router", "expert", "task", "backbone")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class ComponentEntry:
    """One registration: ``kind/name`` implemented by ``target``, provided by ``plugin``."""

    kind: str
    name: str
    target: str
    summary: str
    plugin: str
    version: str = ""

    @property
    def qualified_name(self) -> str:
        """``plugin:name``, unique even when two plugins register the same name."""
        return f"{self.plugin}:{self.name}"

    def load(self) -> type:
        """Import and return the class behind ``target`` (this may import torch)."""
        module_name, _, attr = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - re-raised with the plugin named
            raise AudioMoEError(
                f"{self.kind} '{self.name}' from plugin '{self.plugin}' {self.version}: cannot import "
                f"'{self.target}': {type(exc).__name__}: {exc}. Check that the plugin is installed "
                f"with its dependencies."
            ) from exc
        return obj


@dataclass(frozen=True)
class PresetEntry:
    """A named model spec (a recipe), provided by ``plugin``."""

    name: str
    spec: Mapping[str, Any]
    summary: str
    plugin: str
    version: str = ""


@dataclass
class PluginRecord:
    """What happened to one plugin: ``loaded``, ``failed`` or ``disabled``."""

    name: str
    dist: str
    version: str
    status: str
    source: str = ""
    error: str = ""
    hooks: list[str] = field(default_factory=list)
    components: int = 0
    presets: int = 0


class _RegistryFile(BaseModel):
    """Schema of ``audiomoe/registry.yaml``."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    defaults: dict[str, str] = Field(default_factory=dict)
    components: dict[str, dict[str, "_ComponentLine"]] = Field(default_factory=dict)
    presets: dict[str, "_PresetLine"] = Field(default_factory=dict)


class _ComponentLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str
    summary: str = ""


class _PresetLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    summary: str = ""
    spec: dict[str, Any]


_RegistryFile.model_rebuild()


@lru_cache(maxsize=None)
def load_registry_file() -> _RegistryFile:
    """Load and validate the packaged ``registry.yaml`` with a safe YAML loader."""
    text = resources.files("audiomoe").joinpath("registry.yaml").read_text(encoding="utf-8")
    try:
        return _RegistryFile.model_validate(yaml.safe_load(text) or {})
    except ValidationError as exc:  # a packaging bug, but say where
        raise AudioMoEError(f"audiomoe/registry.yaml is invalid:\n{exc}") from exc


def _audiomoe_version() -> str:
    try:
        return importlib_metadata.version("audiomoe")
    except importlib_metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


class Registry:
    """Components and presets contributed by a set of plugins.

    ``Registry()`` loads the built-in plugin and every installed entry point. For tests and
    notebooks, :meth:`isolated` loads only the plugins you give it::

        reg = Registry.isolated(my_plugin_module)
        model = audiomoe.compose("my-preset", registry=reg)
    """

    def __init__(
        self,
        plugins: Sequence[object] = (),
        *,
        builtin: bool = True,
        entry_points: bool = True,
        strict: Optional[bool] = None,
        disabled: Optional[Iterable[str]] = None,
    ) -> None:
        self.strict = _env_flag(STRICT_ENV) if strict is None else strict
        env_disabled = [s.strip() for s in os.environ.get(DISABLE_ENV, "").split(",") if s.strip()]
        self.disabled = set(env_disabled if disabled is None else disabled)
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}
        self._components: dict[tuple[str, str], list[ComponentEntry]] = {}
        self._presets: dict[str, list[PresetEntry]] = {}
        self.defaults: dict[str, str] = dict(load_registry_file().defaults)

        if builtin:
            from audiomoe.plugins import builtin as builtin_module

            self._add_plugin(builtin_module, BUILTIN_PLUGIN, "audiomoe", _audiomoe_version(), "audiomoe.plugins.builtin")
        for plugin in plugins:
            name = getattr(plugin, "__audiomoe_plugin_name__", None) or getattr(plugin, "__name__", None) or type(plugin).__name__
            self._add_plugin(plugin, str(name), str(name), "", repr(plugin))
        if entry_points:
            self._load_entry_points()
        self._check_pending()
        self._collect()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def isolated(cls, *plugins: object, builtin: bool = True, strict: bool = True) -> "Registry":
        """A registry holding only ``plugins`` (and the built-ins unless ``builtin=False``).

        Installed entry points are ignored, so results do not depend on the environment.
        """
        return cls(plugins, builtin=builtin, entry_points=False, strict=strict, disabled=())

    def _fail(self, record: PluginRecord, exc: BaseException, what: str) -> None:
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        label = f"'{record.name}' ({record.dist} {record.version})".replace(" )", ")")
        msg = f"audiomoe: plugin {label} failed to {what} and was skipped: {record.error}"
        if self.strict:
            raise PluginLoadError(msg + f" (strict mode: unset {STRICT_ENV} to skip broken plugins)") from exc
        warnings.warn(msg + f". Set {DISABLE_ENV}={record.name} to silence this.", RuntimeWarning, stacklevel=3)

    def _add_plugin(self, obj: object, name: str, dist: str, version: str, source: str) -> None:
        record = PluginRecord(name=name, dist=dist, version=version, status="loaded", source=source)
        if name in self.plugins:
            record.name = name = f"{name}#{len(self.plugins)}"
        self.plugins[name] = record
        try:
            self._pm.register(obj, name=name)
        except Exception as exc:  # noqa: BLE001 - pluggy validation errors name the bad hookimpl
            self._fail(record, exc, "register")
            return
        record.hooks = sorted(h.name for h in (self._pm.get_hookcallers(obj) or []))

    def _load_entry_points(self) -> None:
        eps = importlib_metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP)
        for ep in sorted(eps, key=lambda e: ((e.dist.name if e.dist else ""), e.name)):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            if ep.name in self.disabled or dist in self.disabled:
                self.plugins[ep.name] = PluginRecord(ep.name, dist, version, "disabled", ep.value)
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # noqa: BLE001 - one broken plugin must not break the kit
                record = PluginRecord(ep.name, dist, version, "failed", ep.value)
                self.plugins[ep.name] = record
                self._fail(record, exc, "import")
                continue
            self._add_plugin(obj, ep.name, dist, version, ep.value)

    def _check_pending(self) -> None:
        known = {"audiomoe_register_components", "audiomoe_register_presets"}
        for pname, record in self.plugins.items():
            plugin = self._pm.get_plugin(pname)
            if plugin is None:
                continue
            for attr in dir(plugin):
                if not attr.startswith("audiomoe_") or attr in known:
                    continue
                if self._pm.parse_hookimpl_opts(plugin, attr) is not None:
                    exc = AudioMoEError(f"unknown hook '{attr}'.{did_you_mean(attr, known)}")
                    self._pm.unregister(name=pname)
                    self._fail(record, exc, "register")
                    break

    def _collect(self) -> None:
        """Call each plugin's hooks separately, in plugin-name order; keep only complete plugins."""
        hooks = self._pm.hook
        impls = {
            "components": hooks.audiomoe_register_components.get_hookimpls(),
            "presets": hooks.audiomoe_register_presets.get_hookimpls(),
        }
        for pname in sorted(self.plugins):
            record = self.plugins[pname]
            if record.status != "loaded":
                continue
            comps: list[ComponentEntry] = []
            presets: list[PresetEntry] = []

            def reg_component(kind: str, name: str, target: str, summary: str = "", _r=record, _out=comps) -> None:
                _check_registration(kind, name, target)
                _out.append(ComponentEntry(kind, name, target, str(summary).strip(), _r.name, _r.version))

            def reg_preset(name: str, spec: Mapping[str, Any], summary: str = "", _r=record, _out=presets) -> None:
                if not isinstance(name, str) or not _NAME_RE.match(name):
                    raise ValueError(f"preset name {name!r} must match {_NAME_RE.pattern}")
                if not isinstance(spec, Mapping):
                    raise TypeError(f"preset '{name}': spec must be a mapping, got {type(spec).__name__}")
                _out.append(PresetEntry(name, dict(spec), str(summary).strip(), _r.name, _r.version))

            try:
                for impl in impls["components"]:
                    if impl.plugin_name == pname:
                        impl.function(register=reg_component)
                for impl in impls["presets"]:
                    if impl.plugin_name == pname:
                        impl.function(register=reg_preset)
            except Exception as exc:  # noqa: BLE001 - a plugin that fails contributes nothing
                self._fail(record, exc, "register its components")
                continue
            record.components, record.presets = len(comps), len(presets)
            for c in comps:
                self._components.setdefault((c.kind, c.name), []).append(c)
            for p in presets:
                self._presets.setdefault(p.name, []).append(p)

    # -- queries ------------------------------------------------------------------------------

    @property
    def failed_plugins(self) -> list[str]:
        """Names of plugins that failed to load (shown in "unknown component" errors)."""
        return [f"{r.name} ({r.dist} {r.version})" for r in self.plugins.values() if r.status == "failed"]

    def kinds(self) -> list[str]:
        """Every kind with at least one registered component."""
        return sorted({k for k, _ in self._components})

    def list_components(self, kind: Optional[str] = None, pattern: str = "*") -> list[ComponentEntry]:
        """Registered components, sorted, optionally filtered by kind and a glob on the name."""
        if kind is not None and kind not in self.kinds():
            raise UnknownComponentError("kind", kind, self.kinds())
        out = [
            e
            for (k, n), entries in self._components.items()
            for e in entries
            if (kind is None or k == kind) and (fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(e.qualified_name, pattern))
        ]
        return sorted(out, key=lambda e: (e.kind, e.name, e.plugin))

    def get_component(self, kind: str, name: Optional[str]) -> ComponentEntry:
        """Resolve ``name`` (or ``plugin:name``; ``None`` means the kind's default) to one entry."""
        if name is None:
            if kind not in self.defaults:
                raise AudioMoEError(f"no {kind} named and registry.yaml has no default {kind}: give a name")
            name = self.defaults[kind]
        plugin, sep, bare = name.rpartition(":")
        entries = self._components.get((kind, bare), [])
        if sep:
            entries = [e for e in entries if e.plugin == plugin]
        if not entries:
            available = sorted({n for (k, n) in self._components if k == kind})
            if sep and self._components.get((kind, bare)):
                providers = [e.plugin for e in self._components[(kind, bare)]]
                available = [f"{p}:{bare}" for p in providers]
            raise UnknownComponentError(kind, name, available, self.failed_plugins)
        if len(entries) > 1:
            raise AmbiguousComponentError(
                kind, bare, [f"{e.plugin} ({e.version})" if e.version else e.plugin for e in entries]
            )
        return entries[0]

    def list_presets(self, pattern: str = "*") -> list[PresetEntry]:
        """Registered presets, sorted by name, filtered by a glob."""
        out = [p for name, ps in self._presets.items() for p in ps if fnmatch.fnmatchcase(name, pattern)]
        return sorted(out, key=lambda p: (p.name, p.plugin))

    def has_preset(self, name: str) -> bool:
        """Whether ``name`` (or ``plugin:name``) names a registered preset."""
        return bool(self._presets.get(name.rpartition(":")[2]))

    def get_preset(self, name: str) -> PresetEntry:
        """Resolve a preset name (or ``plugin:name``) to one entry."""
        plugin, sep, bare = name.rpartition(":")
        entries = self._presets.get(bare, [])
        if sep:
            entries = [p for p in entries if p.plugin == plugin]
        if not entries:
            raise UnknownComponentError("preset", name, sorted(self._presets), self.failed_plugins)
        if len(entries) > 1:
            raise AmbiguousComponentError("preset", bare, [p.plugin for p in entries])
        return entries[0]


def _check_registration(kind: Any, name: Any, target: Any) -> None:
    if not isinstance(kind, str) or not _NAME_RE.match(kind):
        raise ValueError(f"component kind {kind!r} must be a word like 'router'")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r} must match {_NAME_RE.pattern} (no ':' - that qualifies by plugin)")
    if not isinstance(target, str) or not _TARGET_RE.match(target):
        raise ValueError(
            f"{kind} '{name}': target {target!r} must be an import string 'package.module:ClassName' "
            "(register strings, not classes, so listing stays fast)"
        )


_default: Optional[Registry] = None


def get_registry() -> Registry:
    """The process-wide registry (built-ins plus installed entry points), created on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def reset_registry() -> None:
    """Forget the process-wide registry so the next use rediscovers plugins (after a pip install)."""
    global _default
    _default = None
    load_registry_file.cache_clear()


RegisterCallback = Callable[..., None]
