"""The built-in plugin: registers every component, component preset and preset listed in ``audiomoe/registry.yaml``.

It uses exactly the hooks a third-party plugin uses (see ``examples/plugin-template``), so the
plugin API is exercised by the kit itself. Only import strings are registered: nothing heavy is
imported here.
"""

from __future__ import annotations

from audiomoe.core.hookspecs import RegisterComponent, RegisterKind, RegisterPreset, hookimpl
from audiomoe.core.registry_file import load_registry_file


@hookimpl
def audiomoe_register_kinds(register: RegisterKind) -> None:
    """Declare the kinds used under ``components:`` in registry.yaml, with the ``defaults:`` there."""
    data = load_registry_file()
    for kind in sorted(set(data.components) | set(data.defaults)):
        register(kind, default=data.defaults.get(kind))


@hookimpl
def audiomoe_register_components(register: RegisterComponent) -> None:
    """Register the components listed under ``components:`` in registry.yaml, with their component presets."""
    for kind, entries in load_registry_file().components.items():
        for name, line in entries.items():
            register(kind, name, line.target, line.summary)
            for preset, p in line.presets.items():
                if p.alias_of:
                    register(kind, preset, summary=p.summary, alias_of=p.alias_of, renamed_params=p.renamed_params)
                else:
                    register(kind, preset, summary=p.summary, preset_of=name, params=p.params)


@hookimpl
def audiomoe_register_presets(register: RegisterPreset) -> None:
    """Register the presets listed under ``presets:`` in registry.yaml."""
    for name, line in load_registry_file().presets.items():
        register(name, line.spec, line.summary)
