"""Pydantic specs: the typed shape of every configuration audiomoe accepts.

- :class:`Params` is the base of every component's knobs (``extra="forbid"``: a typo is an error).
- :class:`ComponentSpec` is ``{name, params}``; a bare string is shorthand for ``{name: <string>}``.
- :func:`Slot` marks a ``Params`` field as a child component of a given kind. The composer
  resolves the child through the registry, validates its params against the child's own
  ``Params``, and injects a builder for it into the parent's constructor.
- :class:`ModelSpec` names the parts of a whole model.

No torch here: specs are validated (``audiomoe validate``) without building anything.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from audiomoe.core.limits import MAX_D_MODEL, MAX_SEED


class Params(BaseModel):
    """Base class of a component's params: only the component's own knobs, strictly validated.

    Sizes the composer knows (``d_model``, the number of experts, ...) are *not* params: they are
    injected as keyword arguments of the component's constructor.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads True as 1, and YAML reads `yes`/`on` as True: `num_experts=yes`
        # would quietly become 1 expert. A number field takes numbers only.
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _wants_number(field.annotation):
            items = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, bool) for v in items):
                raise ValueError(f"expected a number, got a boolean ({value!r}; YAML reads yes/no/on/off as booleans)")
        return value


def _wants_number(annotation: Any) -> bool:
    """True for int / float annotations, also inside Optional[...], list[...] and tuple[...]."""
    if annotation in (int, float):
        return True
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _wants_number(args[0])
    if origin in (typing.Union, types.UnionType, list, tuple):
        inner = [a for a in args if a is not type(None) and a is not Ellipsis]
        return bool(inner) and all(_wants_number(a) for a in inner)
    return False


class ComponentSpec(BaseModel):
    """A reference to a registered component: its registry ``name`` and its ``params``.

    ``name`` may be qualified as ``plugin:name`` when two plugins register the same name, and may
    be omitted to use the registry's default for the slot's kind (``defaults:`` in registry.yaml).
    """

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = Field(default=None, description="registry name, or plugin:name")
    params: dict[str, Any] = Field(default_factory=dict, description="the component's knobs")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        return data


@dataclass(frozen=True)
class SlotInfo:
    """Metadata marking a params field as a child component slot of ``kind``."""

    kind: str


def Slot(kind: str) -> SlotInfo:
    """Mark a field as a child component of ``kind``: ``router: Annotated[ComponentSpec, Slot("router")]``."""
    return SlotInfo(kind)


def slot_fields(params_cls: type[BaseModel]) -> dict[str, tuple[str, str]]:
    """Return ``{field: (kind, container)}`` for the child slots of ``params_cls``.

    ``container`` is ``"one"`` (a spec, maybe optional), ``"list"`` or ``"dict"``.
    """
    out: dict[str, tuple[str, str]] = {}
    for fname, field in params_cls.model_fields.items():
        info = next((m for m in field.metadata if isinstance(m, SlotInfo)), None)
        if info is None:
            continue
        ann = field.annotation
        origin = typing.get_origin(ann)
        if origin in (list, typing.List):
            container = "list"
        elif origin in (dict, typing.Dict):
            container = "dict"
        else:
            container = "one"
        out[fname] = (info.kind, container)
    return out


class ModelSpec(Params):
    """A whole model: an encoder (a single one or a mixture), an adapter, an optional backbone, task heads.

    Example (YAML)::

        d_model: 64
        encoder: {name: conv_frontend, params: {channels: 32}}
        backbone: {name: moe_stack, params: {num_layers: 2, router: top_k}}
        tasks:
          emotion: {name: classification, params: {num_classes: 4}}
    """

    d_model: int = Field(256, ge=1, le=MAX_D_MODEL, description="width of the shared representation after the encoder")
    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="fixes the initial parameters (same spec + seed = same model); `train --seed` fixes the data order and dropout",
    )
    encoder: Annotated[ComponentSpec, Slot("encoder")] = Field(
        default_factory=ComponentSpec, description="the audio encoder (or mixture of encoders)"
    )
    adapter: Annotated[Optional[ComponentSpec], Slot("adapter")] = Field(
        None,
        description="encoder frames -> d_model (linear, stack_mlp, conv); None: a linear map, identity when the widths match",
    )
    backbone: Annotated[Optional[ComponentSpec], Slot("backbone")] = Field(
        None, description="optional sequence model between encoder and heads (e.g. an MoE transformer)"
    )
    tasks: Annotated[dict[str, ComponentSpec], Slot("head")] = Field(
        default_factory=dict,
        validate_default=True,
        description="task heads by task name; each batch item names its task",
    )

    @field_validator("tasks")
    @classmethod
    def _needs_a_task(cls, tasks: dict[str, ComponentSpec]) -> dict[str, ComponentSpec]:
        if not tasks:
            raise ValueError("a model needs at least one task head (e.g. tasks: {cls: classification})")
        return tasks
