"""audiomoe: a plugin-based PyTorch kit for multi-task audio models (MoWE-Audio, UniMoE-Audio).

Public surface::

    import audiomoe
    model = audiomoe.compose("tiny-moe-cls", overrides=["backbone.moe.router.k=1"])
    audiomoe.list_components("router")          # no torch import
    audiomoe.describe("router", "top_k")  # params, defaults, limits, an example
    audiomoe.hookimpl                           # for plugin authors
    audiomoe.Encoder, Router, Expert, Head      # base classes
    audiomoe.testing.check_component(...)       # conformance check for plugin authors

``import audiomoe`` and listing do not import torch; the torch-backed names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from audiomoe.core.errors import (
    AmbiguousComponentError,
    AudioMoEError,
    ConfigError,
    ConfigProblem,
    PluginLoadError,
    UnknownComponentError,
)
from audiomoe.core.hookspecs import hookimpl
from audiomoe.core.registry import ComponentEntry, PresetEntry, Registry, get_registry, reset_registry
from audiomoe.core.specs import ComponentSpec, ModelSpec, Params, Slot

__version__ = "0.1.0"

_LAZY = {
    "Encoder": "audiomoe.core.interfaces",
    "EncoderOutput": "audiomoe.core.interfaces",
    "Router": "audiomoe.core.interfaces",
    "Routing": "audiomoe.core.interfaces",
    "Expert": "audiomoe.core.interfaces",
    "MoE": "audiomoe.core.interfaces",
    "Fusion": "audiomoe.core.interfaces",
    "Adapter": "audiomoe.core.interfaces",
    "TaskLoss": "audiomoe.core.interfaces",
    "Head": "audiomoe.core.interfaces",
    "Task": "audiomoe.core.interfaces",  # deprecated alias of Head (warns)
    "Backbone": "audiomoe.core.interfaces",
    "BackboneOutput": "audiomoe.core.interfaces",
    "AudioModel": "audiomoe.model",
    "AudioBatch": "audiomoe.model",
    "ModelOutput": "audiomoe.model",
    "Builder": "audiomoe.core.composer",
    "component_builder": "audiomoe.core.composer",
    "compose": "audiomoe.core.composer",
    "resolve": "audiomoe.core.composer",
    "count_parameters": "audiomoe.core.composer",
    "describe": "audiomoe.core.describe",
}

__all__ = [
    "AmbiguousComponentError",
    "AudioMoEError",
    "ComponentEntry",
    "ComponentSpec",
    "ConfigError",
    "ConfigProblem",
    "ModelSpec",
    "Params",
    "PluginLoadError",
    "PresetEntry",
    "Registry",
    "Slot",
    "UnknownComponentError",
    "get_registry",
    "hookimpl",
    "list_components",
    "list_presets",
    "reset_registry",
    "testing",
    *_LAZY,
]


def list_components(
    kind: Optional[str] = None, pattern: str = "*", *, registry: Optional[Registry] = None
) -> list[ComponentEntry]:
    """Registered components, optionally of one ``kind`` and matching a glob ``pattern``.

    Imports no component (and no torch): entries are import strings with a summary.
    """
    return (registry or get_registry()).list_components(kind, pattern)


def list_presets(pattern: str = "*", *, registry: Optional[Registry] = None) -> list[PresetEntry]:
    """Registered presets matching a glob ``pattern``."""
    return (registry or get_registry()).list_presets(pattern)


_DEPRECATED = {"Task"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        if name not in _DEPRECATED:  # a deprecated alias is never cached: it warns on every use, not only the first
            globals()[name] = value
        return value
    if name == "testing":
        return importlib.import_module("audiomoe.testing")
    raise AttributeError(f"module 'audiomoe' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
