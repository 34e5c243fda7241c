"""The packaged ``audiomoe/registry.yaml``: its schema (pydantic, ``extra="forbid"``) and its safe loader.

The file lists the built-in components (``kind -> name -> {target, summary}``), each with optional
*component presets* under ``presets:`` - other registered names of that component with other
default params (``top_p`` is ``scored`` with a top-p selector), or a deprecated old name
(``alias_of``) whose old param names are read as new ones (``renamed_params``) - plus the per-kind
``defaults:`` and the named model specs under the top-level ``presets:``. Only the built-in plugin
reads it; it registers what it finds through the same hooks a third-party plugin uses.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from audiomoe.core.errors import AudioMoEError


class ComponentPresetLine(BaseModel):
    """A component preset: the enclosing component (or ``alias_of``) under another name, with other defaults."""

    model_config = ConfigDict(extra="forbid")

    summary: str = ""
    params: dict[str, Any] = Field(default_factory=dict, description="defaults beneath the user's, per top-level param")
    alias_of: Optional[str] = Field(None, description="a deprecated old name of this sibling preset or component")
    renamed_params: dict[str, str] = Field(
        default_factory=dict, description="alias only: old param -> new ('slot.param')"
    )

    @model_validator(mode="after")
    def _alias_or_preset(self) -> "ComponentPresetLine":
        if self.alias_of and self.params:
            raise ValueError("an alias (alias_of) has no params of its own: it is the other name's exactly")
        if self.renamed_params and not self.alias_of:
            raise ValueError("renamed_params belong to an alias (alias_of): a new preset uses the new names")
        return self


class ComponentLine(BaseModel):
    """One built-in component: its import string, a summary, and its component presets."""

    model_config = ConfigDict(extra="forbid")

    target: str
    summary: str = ""
    presets: dict[str, ComponentPresetLine] = Field(default_factory=dict)


class PresetLine(BaseModel):
    """A named model spec (a recipe for ``audiomoe.compose(name)``)."""

    model_config = ConfigDict(extra="forbid")

    summary: str = ""
    spec: dict[str, Any]


class RegistryFile(BaseModel):
    """Schema of ``audiomoe/registry.yaml``."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    defaults: dict[str, str] = Field(default_factory=dict)
    components: dict[str, dict[str, ComponentLine]] = Field(default_factory=dict)
    presets: dict[str, PresetLine] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names_are_unique_per_kind(self) -> "RegistryFile":
        for kind, lines in self.components.items():
            seen = set(lines)
            for base, line in lines.items():
                for name in line.presets:
                    if name in seen:
                        raise ValueError(f"{kind} '{name}' is listed twice (a component preset of '{base}' too)")
                    seen.add(name)
        return self


@lru_cache(maxsize=None)
def load_registry_file() -> RegistryFile:
    """Load and validate the packaged ``registry.yaml`` with a safe YAML loader."""
    text = resources.files("audiomoe").joinpath("registry.yaml").read_text(encoding="utf-8")
    try:
        return RegistryFile.model_validate(yaml.safe_load(text) or {})
    except ValidationError as exc:  # a packaging bug, but say where
        raise AudioMoEError(f"audiomoe/registry.yaml is invalid:\n{exc}") from exc
