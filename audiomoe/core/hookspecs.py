"""The plugin hooks of audiomoe (pluggy project ``audiomoe``, entry-point group ``audiomoe``).

A plugin is any importable object (usually a module) with functions marked ``@audiomoe.hookimpl``.
Third-party packages expose it through an entry point::

    [project.entry-points.audiomoe]
    my_plugin = "my_package.plugin"

The built-in components are registered by :mod:`audiomoe.plugins.builtin` through these same
hooks. Plugins register *import strings*, never classes, so that listing components imports
nothing heavy (no torch). Hooks receive a ``register`` callback rather than returning values:
new keyword arguments can be added to the callback later without breaking existing plugins.

Call order does not matter: audiomoe calls each plugin's implementation separately, in sorted
plugin-name order, and records every registration with the plugin that made it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

import pluggy

PROJECT = "audiomoe"
ENTRY_POINT_GROUP = "audiomoe"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegisterComponent(Protocol):
    """The callback passed to :func:`audiomoe_register_components`."""

    def __call__(
        self,
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
        """Register ``name`` of ``kind``: implemented by ``target`` (``"pkg.module:Class"``), or a preset / alias of another."""


class RegisterKind(Protocol):
    """The callback passed to :func:`audiomoe_register_kinds`."""

    def __call__(self, kind: str, summary: str = "", default: Optional[str] = None) -> None:
        """Declare ``kind`` (a new kind of component), optionally with the ``default`` component name."""


class RegisterPreset(Protocol):
    """The callback passed to :func:`audiomoe_register_presets`."""

    def __call__(self, name: str, spec: Mapping[str, Any], summary: str = "") -> None:
        """Register preset ``name``: a model spec as a plain mapping (the YAML form)."""


@hookspec
def audiomoe_register_components(register: RegisterComponent) -> None:
    """Register components (encoders, routers, experts, tasks, backbones, ...).

    :param register: call ``register(kind, name, target, summary)`` once per component.

        - ``kind``: one of ``"encoder"``, ``"router"``, ``"expert"``, ``"head"`` (``"task"``: deprecated alias), ``"backbone"``,
          a kind another plugin declares (the built-in ``"scorer"``, ``"selector"``), or a kind your
          plugin declares in :func:`audiomoe_register_kinds`. An undeclared kind (a typo such as
          ``"routr"``) is an error with a "did you mean", so the plugin is skipped.
        - ``name``: the registry name used in configs (``[a-z0-9_.-]``). Prefix generic names with
          your package (``acme_topk``); users can always write ``your_plugin:name``. A name another
          plugin also registers never changes what the other plugin's presets and defaults build;
          users who type the bare name get an error naming ``builtin:name`` and ``your_plugin:name``.
        - ``target``: ``"package.module:ClassName"``. It is imported only when the component is
          built or described, so listing stays fast. The class must subclass the base class of its
          kind and define a nested pydantic ``Params`` model.
        - ``summary``: one line shown by ``audiomoe list``.
        - ``preset_of`` + ``params`` (instead of ``target``): a *component preset*, the component
          ``preset_of`` of the same kind (yours or another plugin's, ``plugin:name`` to pick one)
          with other defaults. ``params`` lie beneath the user's, merged per top-level param (a
          user's slot spec replaces the preset's), and specs record the preset's name.
        - ``alias_of`` (instead of ``target``): a deprecated old name of another component; using
          it warns and specs record the new name. ``renamed_params`` maps its old param names to
          new ones (``"slot.param"`` writes into a slot's params).

    Example::

        import audiomoe

        @audiomoe.hookimpl
        def audiomoe_register_components(register):
            register("router", "acme_topk", "acme_router.router:AcmeTopK", "Top-k with a twist")
            register("router", "acme_top3", summary="builtin top_k with k=3", preset_of="builtin:top_k", params={"k": 3})
    """


@hookspec
def audiomoe_register_presets(register: RegisterPreset) -> None:
    """Register presets: named model specs that ``audiomoe.compose(name)`` builds.

    :param register: call ``register(name, spec, summary)`` once per preset. ``spec`` is the
        mapping form of a model spec (what a YAML config holds); it is validated when used, so a
        broken preset cannot break listing.

    Example::

        @audiomoe.hookimpl
        def audiomoe_register_presets(register):
            register("acme-tiny", {"d_model": 32, "encoder": {"name": "conv_frontend"},
                                   "tasks": {"cls": {"name": "classification"}}},
                     "A tiny model with the acme router")
    """


@hookspec
def audiomoe_register_kinds(register: RegisterKind) -> None:
    """Declare new kinds of component (a new kind of child slot, e.g. ``Slot("decoder")``).

    :param register: call ``register(kind, summary, default)`` once per kind. ``kind`` is a word
        (``[a-z0-9_.-]``, not ``preset``); ``default`` optionally names the component used when a
        ``kind`` slot names none (your plugin's component first). A kind may be declared by several
        plugins; the built-in plugin's default wins, otherwise a default given by two plugins must
        be chosen by naming a component. Kinds are collected from every plugin before any
        component, so your components may use a kind another plugin declares.

    Example::

        @audiomoe.hookimpl
        def audiomoe_register_kinds(register):
            register("decoder", "Turns backbone states into audio", default="acme_decoder")
    """
