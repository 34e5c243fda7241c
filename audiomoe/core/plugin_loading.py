"""Finding and loading plugins: the built-in one, objects given by the caller, installed entry points.

Loading rules (from the plugin-design notes: llm #1280, pluggy #705, timm #1694):

- The built-in plugin is loaded by its module name, through the same path as any other plugin,
  so ``audiomoe.core`` imports nothing outside ``core/``.
- Entry points of group ``audiomoe`` are loaded one at a time, sorted by distribution and
  entry-point name. A plugin that fails to import or to register is skipped with a warning naming
  it and its version; ``AUDIOMOE_STRICT_PLUGINS=1`` (or ``strict=True``) raises instead.
- ``AUDIOMOE_DISABLE_PLUGINS=a,b`` disables plugins by entry-point or distribution name.
- A plugin that loads but registers nothing is warned about, naming the file its module was
  imported from: the usual cause is a same-named folder in the working directory shadowing the
  installed package. Strict mode raises.

Nothing here imports torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata as importlib_metadata
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import pluggy

from audiomoe.core import hookspecs
from audiomoe.core.errors import AudioMoEError, PluginLoadError, did_you_mean

STRICT_ENV = "AUDIOMOE_STRICT_PLUGINS"
DISABLE_ENV = "AUDIOMOE_DISABLE_PLUGINS"
BUILTIN_PLUGIN = "builtin"
#: Imported by name: core must not import the package's concrete parts.
BUILTIN_MODULE = "audiomoe.plugins.builtin"
HOOK_NAMES = frozenset(n for n in vars(hookspecs) if n.startswith("audiomoe_register_"))


@dataclass
class PluginRecord:
    """What happened to one plugin: ``loaded``, ``empty`` (registered nothing), ``failed`` or ``disabled``."""

    name: str
    dist: str
    version: str
    status: str
    source: str = ""
    error: str = ""
    hooks: list[str] = field(default_factory=list)
    components: int = 0
    presets: int = 0
    kinds: int = 0
    module_file: str = ""


def audiomoe_version() -> str:
    """The installed audiomoe version (``0+unknown`` when run from a source tree)."""
    try:
        return importlib_metadata.version("audiomoe")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def module_origin(obj: object) -> str:
    """Where the module behind a plugin object was imported from (a file, or a namespace folder)."""
    mod = inspect.getmodule(obj)
    if mod is None:
        return f"{type(obj).__name__} object with no module"
    file = getattr(mod, "__file__", None)
    if file:
        return f"module '{mod.__name__}' imported from {file}"
    path = list(getattr(mod, "__path__", None) or [])
    if path:
        # A folder without __init__.py: an empty namespace package, the typical shadowing case.
        return f"module '{mod.__name__}' imported from {', '.join(path)} (a folder without __init__.py)"
    return f"module '{mod.__name__}' (created in memory, no file)"


class PluginHost:
    """Loads plugins into a pluggy manager and keeps a :class:`PluginRecord` for each one."""

    def __init__(self, *, strict: Optional[bool] = None, disabled: Optional[Iterable[str]] = None) -> None:
        self.strict = env_flag(STRICT_ENV) if strict is None else strict
        env_disabled = [s.strip() for s in os.environ.get(DISABLE_ENV, "").split(",") if s.strip()]
        self.disabled = set(env_disabled if disabled is None else disabled)
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginRecord] = {}

    def _load_plugins(self, plugins: Sequence[object], builtin: bool, entry_points: bool) -> None:
        if builtin:
            module = importlib.import_module(BUILTIN_MODULE)
            self._add_plugin(module, BUILTIN_PLUGIN, "audiomoe", audiomoe_version(), BUILTIN_MODULE)
        for plugin in plugins:
            name = (
                getattr(plugin, "__audiomoe_plugin_name__", None)
                or getattr(plugin, "__name__", None)
                or type(plugin).__name__
            )
            self._add_plugin(plugin, str(name), str(name), "", repr(plugin))
        if entry_points:
            self._load_entry_points()
        self._check_pending()

    def _fail(self, record: PluginRecord, exc: BaseException, what: str) -> None:
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        msg = f"audiomoe: plugin {self._label(record)} failed to {what}: {record.error}"
        if self.strict:
            raise PluginLoadError(msg + f" (strict mode: unset {STRICT_ENV} to skip broken plugins)") from exc
        msg = msg.replace(f"failed to {what}:", f"failed to {what} and was skipped:")
        warnings.warn(msg + f". Set {DISABLE_ENV}={record.name} to silence this.", RuntimeWarning, stacklevel=4)

    @staticmethod
    def _label(record: PluginRecord) -> str:
        return f"'{record.name}' ({record.dist} {record.version})".replace(" )", ")")

    def _add_plugin(self, obj: object, name: str, dist: str, version: str, source: str) -> None:
        record = PluginRecord(name=name, dist=dist, version=version, status="loaded", source=source)
        record.module_file = module_origin(obj)
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
        # A dist-info without Name/Version metadata gives None here: it must not break sorting.
        for ep in sorted(eps, key=lambda e: (str((e.dist.name if e.dist else "") or ""), str(e.name))):
            dist = (ep.dist.name if ep.dist else None) or "?"
            version = (ep.dist.version if ep.dist else None) or "?"
            if ep.name in self.disabled or dist in self.disabled:
                self.plugins[ep.name] = PluginRecord(ep.name, dist, version, "disabled", ep.value)
                continue
            try:
                obj = ep.load()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - one broken plugin (even one calling sys.exit or parsing argv) must not break the kit
                record = PluginRecord(ep.name, dist, version, "failed", ep.value)
                self.plugins[ep.name] = record
                self._fail(record, exc, "import")
                continue
            self._add_plugin(obj, ep.name, dist, version, ep.value)

    def _check_pending(self) -> None:
        for pname, record in self.plugins.items():
            plugin = self._pm.get_plugin(pname)
            if plugin is None:
                continue
            for attr in dir(plugin):
                if not attr.startswith("audiomoe_") or attr in HOOK_NAMES:
                    continue
                if self._pm.parse_hookimpl_opts(plugin, attr) is not None:
                    exc = AudioMoEError(f"unknown hook '{attr}'.{did_you_mean(attr, HOOK_NAMES)}")
                    self._pm.unregister(name=pname)
                    self._fail(record, exc, "register")
                    break

    def _check_empty(self) -> None:
        """Warn about (strict: refuse) a loaded plugin that registered nothing at all."""
        for record in self.plugins.values():
            if record.status != "loaded" or record.components or record.presets or record.kinds:
                continue
            record.status = "empty"
            record.error = f"registered nothing; {record.module_file}"
            msg = (
                f"audiomoe: plugin {self._label(record)} loaded but registered 0 components and 0 presets; "
                f"its {record.module_file}. If that is not the installed package, a file or folder of the same "
                f"name in the working directory (or earlier on sys.path) shadows it: run from another "
                f"directory or rename it"
            )
            if self.strict:
                raise PluginLoadError(msg + f" (strict mode: unset {STRICT_ENV} to allow it)")
            warnings.warn(msg + f". Set {DISABLE_ENV}={record.name} to silence this.", RuntimeWarning, stacklevel=4)
