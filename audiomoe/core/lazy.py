"""Lazy public names for a package (PEP 562): the module holding a name is imported on first use.

Keeps ``import audiomoe.data`` / ``audiomoe.train`` / ``audiomoe.analysis`` (and ``audiomoe --help``)
from importing torch and every submodule up front.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_getattr(package: str, table: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving ``table`` (name -> module, absolute or relative to ``package``), cached in ``namespace``."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        module = table[name] if table[name].startswith(package + ".") else f"{package}.{table[name]}"
        value = namespace[name] = getattr(importlib.import_module(module), name)
        return value

    return __getattr__
