"""The component and preset registry, filled by pluggy plugins (loading: :mod:`.plugin_loading`).

- Each plugin's hook implementation is called on its own with a ``register`` callback bound to
  that plugin, so every registration knows its provider and results never depend on pluggy's
  last-registered-first call order. A plugin whose hook raises contributes nothing.
- Kinds are declared: the core kinds (those with a base class) always exist, a plugin adds a kind
  with ``audiomoe_register_kinds``. Registering under an undeclared kind (a typo such as
  ``routr``) fails that plugin with a "did you mean".
- The same name from two plugins is recorded; using it unqualified is an error that names both
  providers and how to pick one (``plugin:name``), unless the caller says whose names it means
  (``prefer``): the composer passes the author of a preset or of a Params default, so a plugin
  registering ``top_p`` cannot change what the built-in presets build.
- A kind's default (used when a spec names no component) comes from the plugins: the built-in
  plugin's default wins, otherwise the one plugin giving a default; ``Registry.isolated(builtin=False)``
  therefore has no built-in defaults, components or presets.
- A component may be registered as a *preset* of another of its kind (``preset_of`` + ``params``:
  ``top_p`` is ``scored`` with other defaults) or as a deprecated *alias* (``alias_of``); the
  entries and their linking are in :mod:`.entries`, the packaged file's schema in :mod:`.registry_file`.

Nothing here imports torch: components are import strings, loaded only when built or described.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

from audiomoe.core.entries import NAME_RE as _NAME_RE
from audiomoe.core.entries import (
    ComponentEntry,
    KindEntry,
    PresetEntry,
    check_preset_params,
    check_registration,
    link_presets,
)
from audiomoe.core.errors import AmbiguousComponentError, AudioMoEError, UnknownComponentError
from audiomoe.core.plugin_loading import (
    BUILTIN_MODULE,
    BUILTIN_PLUGIN,
    DISABLE_ENV,
    STRICT_ENV,
    PluginHost,
    PluginRecord,
)
from audiomoe.core.registry_file import RegistryFile, load_registry_file

#: Kinds with a base class in :mod:`audiomoe.core.interfaces`: known even without any plugin.
CORE_KINDS = ("encoder", "fusion", "adapter", "router", "expert", "moe", "head", "backbone")
#: Old kind names, accepted with a DeprecationWarning for one release (``task`` became ``head`` in 0.2).
KIND_ALIASES = {"task": "head"}
KNOWN_KINDS = CORE_KINDS  # the name used before kinds could be declared
#: Not component kinds: ``audiomoe list`` / ``describe`` use them for presets.
RESERVED_KINDS = ("preset", "presets")
_GLOB_CHARS = set("*?[")
__all__ = [  # what other modules import from here, some defined in entries.py / registry_file.py
    "BUILTIN_MODULE",
    "BUILTIN_PLUGIN",
    "CORE_KINDS",
    "ComponentEntry",
    "DISABLE_ENV",
    "KIND_ALIASES",
    "KNOWN_KINDS",
    "KindEntry",
    "PresetEntry",
    "RESERVED_KINDS",
    "Registry",
    "RegistryFile",
    "STRICT_ENV",
    "canonical_kind",
    "get_registry",
    "load_registry_file",
    "reset_registry",
]


class Registry(PluginHost):
    """Components, presets and kinds contributed by a set of plugins.

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
        disabled: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(strict=strict, disabled=disabled)
        self._kinds: dict[str, list[KindEntry]] = {k: [] for k in CORE_KINDS}
        self._components: dict[tuple[str, str], list[ComponentEntry]] = {}
        self._presets: dict[str, list[PresetEntry]] = {}
        self._load_plugins(plugins, builtin, entry_points)
        self._collect()
        self._check_empty()

    @classmethod
    def isolated(cls, *plugins: object, builtin: bool = True, strict: bool = True) -> "Registry":
        """A registry holding only ``plugins`` (and the built-ins unless ``builtin=False``).

        Installed entry points are ignored, so results do not depend on the environment. With
        ``builtin=False`` nothing built-in remains: no components, presets or kind defaults.
        """
        return cls(plugins, builtin=builtin, entry_points=False, strict=strict, disabled=())

    def _impls(self, hook: str, pname: str) -> list[Any]:
        return [i for i in getattr(self._pm.hook, hook).get_hookimpls() if i.plugin_name == pname]

    def _collect(self) -> None:
        """Call each plugin's hooks separately, in plugin-name order; keep only complete plugins.

        Kinds first, from every plugin, so that a component may use a kind another plugin declares.
        """
        loaded = lambda: [n for n in sorted(self.plugins) if self.plugins[n].status == "loaded"]
        for pname in loaded():
            kinds: list[KindEntry] = []

            def reg_kind(kind: str, summary: str = "", default: Optional[str] = None, _p=pname, _out=kinds) -> None:
                if not isinstance(kind, str) or not _NAME_RE.match(kind) or kind in RESERVED_KINDS:
                    raise ValueError(f"kind {kind!r} must be a word like 'scorer' (not {', '.join(RESERVED_KINDS)})")
                if default is not None and (not isinstance(default, str) or not _NAME_RE.match(default)):
                    raise ValueError(f"kind '{kind}': default {default!r} must be a component name")
                _out.append(KindEntry(kind, str(summary).strip(), _p, default))

            try:
                for impl in self._impls("audiomoe_register_kinds", pname):
                    impl.function(register=reg_kind)
            except Exception as exc:  # noqa: BLE001 - a plugin that fails contributes nothing
                self._fail(self.plugins[pname], exc, "register its kinds")
                continue
            self.plugins[pname].kinds = len(kinds)
            for k in kinds:
                self._kinds.setdefault(k.kind, []).append(k)
        for pname in loaded():
            self._collect_one(self.plugins[pname])
        # Presets are linked once every plugin has registered: a base may come from any of them.
        self._components = link_presets(self._components, self._select)

    def _collect_one(self, record: PluginRecord) -> None:
        comps: list[ComponentEntry] = []
        presets: list[PresetEntry] = []
        known = self.kinds()

        def reg_component(
            kind: str,
            name: str,
            target: Optional[str] = None,
            summary: str = "",
            *,
            preset_of: Optional[str] = None,
            params: Optional[Mapping[str, Any]] = None,
            alias_of: Optional[str] = None,
            renamed_params: Optional[Mapping[str, str]] = None,
        ) -> None:
            kind = canonical_kind(kind) if isinstance(kind, str) else kind
            if preset_of is not None and alias_of is not None:
                raise ValueError(f"{kind} '{name}': give preset_of or alias_of, not both")
            base = preset_of if alias_of is None else alias_of
            check_registration(kind, name, target, known, base)
            how = "alias" if alias_of is not None else "preset" if preset_of is not None else None
            check_preset_params(kind, name, params or {}, renamed_params or {}, how)
            params, renamed = dict(params or {}), dict(renamed_params or {})
            comps.append(
                ComponentEntry(
                    kind,
                    name,
                    target or "",
                    str(summary).strip(),
                    record.name,
                    record.version,
                    preset_of or "",
                    alias_of or "",
                    params,
                    renamed,
                )
            )

        def reg_preset(name: str, spec: Mapping[str, Any], summary: str = "") -> None:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise ValueError(f"preset name {name!r} must match {_NAME_RE.pattern}")
            if not isinstance(spec, Mapping):
                raise TypeError(f"preset '{name}': spec must be a mapping, got {type(spec).__name__}")
            presets.append(PresetEntry(name, dict(spec), str(summary).strip(), record.name, record.version))

        try:
            for impl in self._impls("audiomoe_register_components", record.name):
                impl.function(register=reg_component)
            for impl in self._impls("audiomoe_register_presets", record.name):
                impl.function(register=reg_preset)
        except Exception as exc:  # noqa: BLE001 - a plugin that fails contributes no component or preset
            # Its kinds stay declared: other plugins' components were already checked against them.
            self._fail(record, exc, "register its components")
            return
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
        """Every known kind: the core kinds plus those declared by plugins (with or without components)."""
        return sorted(self._kinds)

    def check_kind(self, kind: str) -> str:
        """Return ``kind`` if known (an old alias: its new name); else raise :class:`UnknownComponentError`."""
        kind = canonical_kind(kind)
        if kind in RESERVED_KINDS:
            raise AudioMoEError(f"'{kind}' is not a component kind: presets are found with get_preset / list_presets")
        if kind not in self._kinds:
            # 'preset' is offered too: `list` and `describe` accept it where a kind goes.
            raise UnknownComponentError("kind", kind, self.kinds() + ["preset"])
        return kind

    def default_for(self, kind: str) -> tuple[str, str]:
        """``(name, plugin)`` of the component used when a ``kind`` slot names none."""
        givers = [k for k in self._kinds.get(self.check_kind(kind), []) if k.default]
        builtin = [k for k in givers if k.plugin == BUILTIN_PLUGIN]
        # The built-in default wins so that no plugin can change what built-in presets build.
        if builtin or len(givers) == 1:
            k = (builtin or givers)[0]
            return k.default, k.plugin  # type: ignore[return-value]  # givers all have a default
        if not givers:
            raise AudioMoEError(
                f"no {kind} named and no loaded plugin gives a default {kind}: name one (audiomoe list {kind})"
            )
        choices = " or ".join(f"'{k.plugin}:{k.default}'" for k in givers)
        raise AudioMoEError(f"no {kind} named and plugins give different defaults: name one, e.g. {choices}")

    @property
    def defaults(self) -> dict[str, str]:
        """``{kind: default component name}`` for every kind that has a usable default."""
        out = {}
        for kind in self._kinds:
            try:
                out[kind] = self.default_for(kind)[0]
            except AudioMoEError:
                pass
        return out

    def list_components(self, kind: Optional[str] = None, pattern: str = "*") -> list[ComponentEntry]:
        """Registered components, sorted, optionally filtered by kind (a name or a glob) and a glob on the name."""
        if kind is None:
            kinds = set(self._kinds)
        elif _GLOB_CHARS & set(kind):
            kinds = {k for k in self._kinds if fnmatch.fnmatchcase(k, kind)}
            if not kinds and not any(fnmatch.fnmatchcase(r, kind) for r in RESERVED_KINDS):
                raise UnknownComponentError("kind", kind, self.kinds() + ["preset"])
        else:
            kinds = {self.check_kind(kind)}
        out = [
            e
            for (k, n), entries in self._components.items()
            for e in entries
            if k in kinds and (fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(e.qualified_name, pattern))
        ]
        return sorted(out, key=lambda e: (e.kind, e.name, e.plugin))

    def providers(self, kind: str, name: str) -> list[str]:
        """The plugins registering ``kind/name`` (bare name; kind ``preset``: a preset), sorted; two or more means a clash."""
        kind = canonical_kind(kind)
        entries = (
            self._presets.get(name.rpartition(":")[2], [])
            if kind == "preset"
            else self._components.get((kind, name.rpartition(":")[2]), [])
        )
        return sorted(e.plugin for e in entries)

    def get_component(self, kind: str, name: Optional[str], *, prefer: Optional[str] = None) -> ComponentEntry:
        """Resolve ``name`` (or ``plugin:name``; ``None``: the kind's default) to one entry.

        When plugins clash on an unqualified name, ``prefer`` (a plugin name) picks that plugin's
        entry: the composer passes the author of the name (a preset's plugin, the plugin whose
        Params default wrote it). Without it, or when ``prefer`` is not a provider, a clash raises
        :class:`AmbiguousComponentError` listing the valid qualified names.
        """
        kind = self.check_kind(kind)
        if name is None:
            name, prefer = self.default_for(kind)
        entry = self._select(kind, name, prefer)
        if entry.problem:  # a preset whose base cannot be used
            raise AudioMoEError(entry.problem)
        return entry

    def _select(self, kind: str, name: str, prefer: Optional[str]) -> ComponentEntry:
        plugin, sep, bare = name.rpartition(":")
        entries = self._components.get((kind, bare), [])
        if sep:
            entries = [e for e in entries if e.plugin == plugin]
        elif len(entries) > 1 and prefer is not None:
            entries = [e for e in entries if e.plugin == prefer] or entries
        if not entries:
            record = self.plugins.get(plugin)
            if sep and (
                record is None or record.status != "loaded"
            ):  # a spec (a checkpoint's) naming a plugin not loaded here
                raise UnknownComponentError.plugin_missing(
                    kind, name, plugin, "not installed" if record is None else record.status
                )
            available = sorted({n for (k, n) in self._components if k == kind})
            if sep and self._components.get((kind, bare)):
                available = [f"{p}:{bare}" for p in self.providers(kind, bare)]
            raise UnknownComponentError(kind, name, available, self.failed_plugins)
        if len(entries) > 1:
            entries = sorted(entries, key=lambda e: e.plugin)
            raise AmbiguousComponentError(kind, bare, [e.plugin for e in entries], [e.version for e in entries])
        return entries[0]

    def list_presets(self, pattern: str = "*") -> list[PresetEntry]:
        """Registered presets, sorted by name, filtered by a glob on the name or ``plugin:name``."""
        out = [
            p
            for name, ps in self._presets.items()
            for p in ps
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(f"{p.plugin}:{name}", pattern)
        ]
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
            entries = sorted(entries, key=lambda p: p.plugin)
            raise AmbiguousComponentError("preset", bare, [p.plugin for p in entries], [p.version for p in entries])
        return entries[0]


def canonical_kind(kind: str) -> str:
    """``kind``, or the current name of a deprecated one (with a :class:`DeprecationWarning` saying so)."""
    new = KIND_ALIASES.get(kind)
    if new is None:
        return kind
    warnings.warn(
        f"component kind '{kind}' is deprecated: use '{new}' (the alias goes in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    return new


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
