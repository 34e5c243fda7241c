"""Step 1 of the composer: a preset / YAML / mapping / spec -> the raw mapping, and ``key=value`` overrides on it.

A dotted key walks component params without writing ``params`` (``backbone.moe.router.k=2``).
Assigning a name to a component key swaps the component and *resets its params* to the new one's
defaults; ``null`` removes an optional part (``backbone=null``, ``tasks.X=null``). Every problem is
collected (not raised one at a time) so :func:`audiomoe.core.composer.resolve` reports them together.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from pydantic import BaseModel

from audiomoe.core.errors import AudioMoEError, ConfigProblem, did_you_mean, short_repr
from audiomoe.core.limits import MAX_PRESET_CHAIN, MAX_QUOTED_VALUE
from audiomoe.core.names import USER, Origin, author, field_default, mark_typed
from audiomoe.core.registry import ComponentEntry, Registry, get_registry
from audiomoe.core.safe_yaml import YAMLSyntaxError, load_yaml_file, load_yaml_text
from audiomoe.core.specs import ModelSpec, Params, slot_fields

SpecSource = Union[str, os.PathLike, Mapping[str, Any], ModelSpec]


def load_spec(
    source: SpecSource, registry: Optional[Registry] = None, _chain: tuple[str, ...] = ()
) -> tuple[dict[str, Any], str]:
    """Return ``(raw mapping, label)`` for a preset name, YAML path, mapping or ModelSpec.

    YAML is read strictly (:mod:`.safe_yaml`: no duplicate keys, bounded depth and size); a file's
    ``preset:`` include chain is followed at most ``MAX_PRESET_CHAIN`` deep and never in a loop.
    """
    registry = registry or get_registry()
    if isinstance(source, ModelSpec):
        return source.model_dump(mode="json"), "spec"
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), "spec"
    if not isinstance(source, (str, os.PathLike)):
        raise AudioMoEError(f"a model spec is a preset name, a YAML path or a mapping, not {type(source).__name__}")
    text = os.fspath(source)
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or (path.suffix and path.exists()):
        key = os.path.realpath(text)
        if key in _chain:
            raise AudioMoEError(
                f"config file '{text}' includes itself through 'preset:' ({' -> '.join(_chain + (key,))})"
            )
        if len(_chain) >= MAX_PRESET_CHAIN:
            raise AudioMoEError(f"config file '{text}': more than {MAX_PRESET_CHAIN} nested 'preset:' includes")
        data = load_yaml_file(text)
        if not isinstance(data, Mapping):
            raise AudioMoEError(
                f"config file '{text}' must hold a mapping (d_model, encoder, tasks, ...), not {type(data).__name__}"
            )
        if "preset" in data:  # a YAML may start from a preset and change some keys
            if not isinstance(data["preset"], str):
                raise AudioMoEError(
                    f"config file '{text}': 'preset' must be a preset name or YAML path, got {short_repr(data['preset'])}"
                )
            base, _ = load_spec(data["preset"], registry, _chain + (key,))
            rest = {k: v for k, v in data.items() if k != "preset"}
            return _deep_merge(base, rest), f"'{text}'"
        return dict(data), f"'{text}'"
    return copy.deepcopy(dict(registry.get_preset(text).spec)), f"preset '{text}'"


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A config on top of its preset: mappings merge key by key, except that naming another component
    replaces the node (its params start from the new component's defaults, as an override swap does)."""
    out = dict(base)
    for k, v in update.items():
        old = out.get(k)
        swapped = (
            isinstance(v, Mapping) and isinstance(old, Mapping) and "name" in v and v.get("name") != old.get("name")
        )
        if isinstance(v, Mapping) and isinstance(old, Mapping) and not swapped:
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"a.b=value"``; the value is read as a YAML scalar/list (``0.6``, ``true``, ``[1, 2]``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise AudioMoEError(f"override {text!r} must look like key=value (e.g. backbone.moe.router.k=2)")
    if len(value) > MAX_QUOTED_VALUE * 50:
        raise AudioMoEError(f"override '{key}' has a {len(value):,}-character value; put large values in a YAML file")
    try:
        parsed = load_yaml_text(value, f"override '{key}'") if value.strip() else ""
    except YAMLSyntaxError:
        parsed = value  # not YAML: the plain string (validation says if a string is wrong here)
    return key, parsed


def _as_component(value: Any) -> dict[str, Any]:
    if value is None:
        return {"name": None, "params": {}}
    if isinstance(value, str):
        return {"name": value, "params": {}}
    if isinstance(value, Mapping):
        out = dict(value)
        out.setdefault("params", {})
        return out
    return value  # validation reports the bad type


def apply_overrides(
    raw: dict[str, Any],
    overrides: Iterable[str],
    registry: Optional[Registry] = None,
    *,
    origin: Origin = USER,
    typed: Optional[set[str]] = None,
) -> tuple[dict[str, Any], list[ConfigProblem]]:
    """Apply ``key=value`` overrides in order; return the new mapping and any problems found.

    ``origin`` says who wrote ``raw`` (a preset's plugin); the paths whose component names the
    overrides assign are added to ``typed``: those names are the user's (see core/names.py).
    """
    registry = registry or get_registry()
    typed = set() if typed is None else typed
    raw = copy.deepcopy(raw)
    problems: list[ConfigProblem] = []
    for text in overrides:
        key, value = parse_override(text)
        err = _apply_one(raw, key.split("."), value, registry, origin, typed)
        if err:
            problems.append(ConfigProblem(key, err + " (from override)", value, True))
    return raw, problems


def _is_mapping(annotation: Any) -> bool:
    """Whether a field's type is a (possibly Optional) plain ``dict``: nested keys go into it."""
    from typing import get_args, get_origin

    if annotation is dict or get_origin(annotation) is dict:
        return True
    return any(a is dict or get_origin(a) is dict for a in get_args(annotation))


def _set_nested(node: dict[str, Any], keys: list[str], value: Any, where: str) -> Optional[str]:
    """``node[k1][k2]... = value`` (missing levels created; ``null`` removes the key)."""
    for k in keys[:-1]:
        where = f"{where}.{k}"
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            return f"'{where}' is {short_repr(child)}, not a mapping"
        node = child
    if value is None:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return None


def _apply_one(
    raw: dict[str, Any],
    parts: list[str],
    value: Any,
    registry: Registry,
    origin: Origin = USER,
    typed: Optional[set[str]] = None,
) -> Optional[str]:
    # origin / typed / owner: whose names the walked nodes hold (see core/names.py).
    typed = set() if typed is None else typed
    entry: Optional[ComponentEntry] = None  # the component whose params are being walked (None: the model's)
    params_cls: type[BaseModel] = ModelSpec
    container: dict[str, Any] = raw
    i = 0
    while i < len(parts):
        part = parts[i]
        last = i == len(parts) - 1
        slots = slot_fields(params_cls)
        fields = params_cls.model_fields
        renamed = entry.renamed.get(part, "") if entry is not None and part not in fields else ""
        if renamed.split(".")[0] in fields:  # a deprecated alias's old param name
            warnings.warn(entry.deprecation({part: value}), DeprecationWarning, stacklevel=4)  # type: ignore[union-attr]  # entry is an alias here
            parts[i : i + 1] = renamed.split(".")
            continue
        if part not in fields:
            return f"unknown key '{part}'.{did_you_mean(part, fields)} Valid keys here: {', '.join(fields)}"
        if part not in slots:
            if not last:
                if not _is_mapping(fields[part].annotation):
                    return f"'{part}' is a plain value, it has no key '{parts[i + 1]}'"
                # a free-form mapping (a transformers config): set the nested key; the component checks it
                node = container.get(part)
                if node is None:
                    f = fields[part]
                    node = f.get_default(call_default_factory=True)
                if node is not None and not isinstance(node, dict):
                    return f"'{part}' is {short_repr(node)}, not a mapping"
                container[part] = node = copy.deepcopy(node or {})
                return _set_nested(node, parts[i + 1 :], value, part)
            container[part] = value
            return None
        kind, how = slots[part]
        if entry is None:
            slot_origin = origin.slot(part, None, field_default(fields[part]))
        else:
            slot_origin = entry.origin_of(origin, part, params_cls)
        if how == "one":
            if last:  # swap: new name, params back to the new component's defaults
                container[part] = None if value is None else _as_component(value)
                mark_typed(typed, ".".join(parts))
                return None
            node_origin = slot_origin
            # not written in the config: start from the default (a component preset's, else the field's)
            node = container.get(part)
            if node is None:
                node = field_default(fields[part]) if entry is None else entry.default_of(part, params_cls)
                if node is None:
                    return f"'{part}' is not set; set it first with {'.'.join(parts[: i + 1])}=<{kind} name>"
                node = node.model_dump() if isinstance(node, BaseModel) else node
            node = container[part] = _as_component(node)
        else:
            coll = container.setdefault(part, {} if how == "dict" else [])
            if last:
                container[part] = value
                mark_typed(typed, ".".join(parts), container=True)
                return None
            sub = parts[i + 1]
            node_origin = slot_origin.item(sub)
            if how == "dict":
                if not isinstance(coll, dict):
                    return f"'{part}' must be a mapping"
                if i + 1 == len(parts) - 1:
                    if value is None:  # null removes the entry, as backbone=null removes the backbone
                        if sub not in coll:
                            return f"no {kind} '{sub}' under '{part}' to remove.{did_you_mean(sub, coll)}"
                        del coll[sub]
                        return None
                    coll[sub] = _as_component(value)
                    mark_typed(typed, ".".join(parts))
                    return None
                if sub not in coll:
                    return f"no {kind} '{sub}' under '{part}'.{did_you_mean(sub, coll)} Add it with {'.'.join(parts[: i + 2])}=<{kind} name>"
                node = coll[sub] = _as_component(coll[sub])
            else:
                try:
                    idx = int(sub)
                    node = coll[idx] = _as_component(coll[idx])
                except (ValueError, IndexError):
                    return f"'{part}' is a list of {len(coll)}; '{sub}' is not a valid index"
                node_origin = slot_origin.item(idx)
                if i + 1 == len(parts) - 1:
                    if value is None:
                        return f"'{part}' entries cannot be null; set the whole list ({part}=[...]) to drop one"
                    coll[idx] = _as_component(value)
                    mark_typed(typed, ".".join(parts))
                    return None
            i += 1
        # now at a component node: continue into its params
        if not isinstance(node, dict) or not isinstance(node.get("params", {}), dict):
            return f"'{'.'.join(parts[: i + 1])}' is not a component mapping"
        prefer, origin = author(node_origin, node.get("name"), ".".join(parts[: i + 1]), typed)
        try:
            entry = registry.get_component(kind, node.get("name"), prefer=prefer)
            cls = entry.load()
        except AudioMoEError:
            # The unknown/ambiguous name itself is reported once, by validation.
            return f"not applied: '{'.'.join(parts[: i + 1])}' does not name a usable {kind} ({node.get('name')!r})"
        params_cls = getattr(cls, "Params", Params)
        container = node.setdefault("params", {})
        i += 1
    # Only reachable when the path stops at a component's params; never a silent no-op.
    return f"'{'.'.join(parts)}' names a component's params as a whole; set one param or swap the component"


# -- step 2: resolve and validate -------------------------------------------------------------
