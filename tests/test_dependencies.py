"""The package's import graph: ``core/`` imports nothing above it, and no registered part imports another.

Read from the source with ``ast`` (every import, module level or inside a function), so a new
plugin-facing part that reaches into a sibling part fails here. Shared helpers (``grouped.py``,
``functional.py``, the composite router base) are not parts and may be imported by parts.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
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


def _imports_under(folder: str) -> dict[str, set[str]]:
    """``{module: audiomoe modules it imports}`` for every file under ``audiomoe/<folder>``."""
    return {_module(p): {i for i in _imports(p) if i.startswith("audiomoe")} for p in (ROOT / folder).rglob("*.py")}


def test_backbones_never_import_heads():
    bad = {
        m: sorted(i for i in imps if i.startswith("audiomoe.heads")) for m, imps in _imports_under("backbones").items()
    }
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"a backbone serves every head and must not know them (move shared code to backbones/): {bad}"


def test_data_imports_only_core_and_data():
    allowed = ("audiomoe.core", "audiomoe.data")
    bad = {m: sorted(i for i in imps if not i.startswith(allowed)) for m, imps in _imports_under("data").items()}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"data/ builds AudioBatch records from core/ alone (no model, train or heads): {bad}"


def test_nothing_imports_analysis_except_the_cli():
    bad = {}
    for path in ROOT.rglob("*.py"):
        mod = _module(path)
        if mod.startswith("audiomoe.analysis") or mod == "audiomoe.cli":
            continue
        hits = sorted(i for i in _imports(path) if i.startswith("audiomoe.analysis"))
        if hits:
            bad[mod] = hits
    assert not bad, f"analysis/ reads runs; training and models must not depend on it (only audiomoe.cli does): {bad}"


def test_the_folder_rules_see_a_violation(tmp_path, monkeypatch):
    """The readers above catch an import placed in a function body (a rule that cannot fail proves nothing)."""
    fake = tmp_path / "audiomoe" / "data"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from audiomoe.heads.text import TextHead\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "audiomoe")
    found = _imports_under("data")
    assert found == {"audiomoe.data.bad": {"audiomoe.heads.text", "audiomoe.heads.text.TextHead"}}


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
    long = {
        str(p.relative_to(ROOT)): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400
    }
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
            except Exception as exc:
                failed[name] = f"{type(exc).__name__}: {exc}"
    finally:
        for k in [k for k in sys.modules if k == "audiomoe" or k.startswith("audiomoe.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert not failed, failed


def test_no_tracked_file_is_over_500_kb():
    """Weights, wheels and corpora stay out of git (the pre-commit hook refuses them; this catches a bypass)."""
    import subprocess

    repo = ROOT.parent
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    big = {
        f: s
        for f in listed.stdout.split("\0")
        if f and (repo / f).is_file() and (s := (repo / f).stat().st_size) > 500_000
    }
    assert not big, f"files over 500 KB are tracked: {big}"
