"""Strict, bounded YAML loading for configs, ``--set`` values and checkpoint specs.

On top of ``yaml.SafeLoader`` (no tags, no Python objects) it refuses, with the line:

- duplicate keys in a mapping (YAML keeps the last one silently);
- nesting deeper than ``MAX_YAML_DEPTH`` (PyYAML's composer would hit Python's recursion limit);
- documents that expand to more than ``MAX_YAML_NODES`` nodes counting every alias use (the
  "billion laughs" attack), and self-referencing aliases;
- files over ``MAX_CONFIG_BYTES`` and bytes that are not UTF-8.

Every failure is an :class:`AudioMoEError` naming the source, never a raw PyYAML or codec error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.limits import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES


class YAMLSyntaxError(AudioMoEError):
    """The text is not YAML at all (as opposed to YAML that breaks a rule above)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader with a depth cap while composing and a duplicate-key check while constructing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise AudioMoEError(f"nesting deeper than {MAX_YAML_DEPTH} levels at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise AudioMoEError(f"duplicate key {key!r} at line {line} (first given at line {first}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: Any) -> int:
    """Nodes in the document with every alias expanded; raises on a cycle or past the cap."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise AudioMoEError(f"an alias refers to itself (line {node.start_mark.line + 1}); configs must be trees")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(c) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > MAX_YAML_NODES:
            raise AudioMoEError(
                f"expands to more than {MAX_YAML_NODES:,} values (aliases counted at each use); write it out plainly"
            )
        sizes[key] = total
        return total

    return size(root)


def load_yaml_text(text: str, source: str = "YAML") -> Any:
    """Parse one YAML document strictly; errors name ``source`` and the line."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except AudioMoEError as exc:
        raise AudioMoEError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise YAMLSyntaxError(f"{source} is not valid YAML: {detail}") from None
    except RecursionError:  # a construct path the depth cap does not see
        raise AudioMoEError(f"{source} is nested too deeply (limit {MAX_YAML_DEPTH} levels)") from None
    finally:
        loader.dispose()


def read_text_file(path: str | os.PathLike, what: str = "config file", limit: int = MAX_CONFIG_BYTES) -> str:
    """Read a small UTF-8 text file; a missing, oversized, binary or unreadable file is a clear error."""
    p = Path(path)
    if not p.exists():
        raise AudioMoEError(f"{what} '{p}' does not exist")
    if not p.is_file():
        raise AudioMoEError(f"{what} '{p}' is not a file")
    try:
        size = p.stat().st_size
        if size > limit:
            raise AudioMoEError(
                f"{what} '{p}' is {size:,} bytes; a config is at most {limit:,} (is this the right file?)"
            )
        data = p.read_bytes()
    except OSError as exc:
        raise AudioMoEError(f"cannot read {what} '{p}': {exc.strerror or exc}") from None
    if b"\x00" in data:
        raise AudioMoEError(f"{what} '{p}' is a binary file, not YAML text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AudioMoEError(f"{what} '{p}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def load_yaml_file(path: str | os.PathLike, what: str = "config file") -> Any:
    """:func:`read_text_file` + :func:`load_yaml_text`."""
    return load_yaml_text(read_text_file(path, what), f"{what} '{path}'")
