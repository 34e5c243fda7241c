"""The package's import graph: ``core/`` imports nothing above it, and no registered part imports another.

Read from the source with ``ast`` (every import, module level or inside a function), so a new
plugin-facing part that reaches into a sibling part fails here. Shared helpers (``grouped.py``,
``functional.py``, the composite router base) are not parts and may be imported by parts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

import audiomoe

ROOT = Path(audiomoe.__file__).parent


def _module(path: Path) -> str:
    return ".".join(("audiomoe", *path.relative_to(ROOT).with_suffix("").parts))


def _imports(path: Path) -> set[str]:
    """Every module (and ``module.name``) imported by ``path``, relative imports resolved."""
    mod = _module(path).split(".")
    package = mod if path.name == "__init__.py" else mod[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return {i.removesuffix(".__init__") for i in out if i}


def _part_modules() -> dict[str, list[str]]:
    reg = yaml.safe_load((ROOT / "registry.yaml").read_text(encoding="utf-8"))
    parts: dict[str, list[str]] = {}
    for kind, comps in reg["components"].items():
        for name, entry in comps.items():
            parts.setdefault(entry["target"].split(":")[0], []).append(f"{kind}/{name}")
    return parts


def test_core_imports_nothing_outside_core():
    bad = {}
    for path in (ROOT / "core").rglob("*.py"):
        outside = sorted(i for i in _imports(path) if i.startswith("audiomoe") and not i.startswith("audiomoe.core"))
        if outside:
            bad[_module(path)] = outside
    assert not bad, f"core/ must import only core/ (name other code by import string): {bad}"


def test_no_part_imports_another_part():
    parts = _part_modules()
    assert len(parts) > 20  # the registry was read
    bad = {}
    for path in ROOT.rglob("*.py"):
        mod = _module(path)
        if mod in parts:
            others = sorted(i for i in _imports(path) if i in parts and i != mod)
            if others:
                bad[mod] = others
    assert not bad, f"parts must not import each other (the composer injects them): {bad}"


def test_the_import_reader_sees_relative_and_function_level_imports(tmp_path):
    src = ROOT / "core" / "composer.py"
    found = _imports(src)
    assert "audiomoe.core.registry" in found and "importlib" in found  # relative (.registry) and inside build_model


def test_no_source_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, f"split these along their responsibilities: {long}"


def test_every_core_and_part_module_imports_first():
    """Each module imports on its own in a fresh interpreter state (no import-order cycles: core.decoding once had one)."""
    import importlib
    import sys

    modules = sorted({_module(p) for p in (ROOT / "core").rglob("*.py")} | set(_part_modules()))
    saved = {k: v for k, v in sys.modules.items() if k == "audiomoe" or k.startswith("audiomoe.")}
    failed = {}
    try:
        for name in modules:
            for k in [k for k in sys.modules if k == "audiomoe" or k.startswith("audiomoe.")]:
                del sys.modules[k]
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - every failure is reported at once
                failed[name] = f"{type(exc).__name__}: {exc}"
    finally:
        for k in [k for k in sys.modules if k == "audiomoe" or k.startswith("audiomoe.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert not failed, failed
