"""The docs' examples run and their links resolve.

- docs/components.md: every `audiomoe compose` line and every Python block runs; every component section has an example.
- README.md: its `audiomoe compose` lines and Python blocks run (the plugin quick start against
  examples/plugin-template); it stays short.
- README.md and docs/*.md: every relative link points at an existing file (and heading, for `#anchor` links).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from audiomoe.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COMPONENTS = ROOT / "docs" / "components.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220
PLUGIN_TEMPLATE = ROOT / "examples" / "plugin-template"


def _blocks(text: str, lang: str) -> list[str]:
    """The fenced ``lang`` blocks of ``text``, dedented (blocks inside list items are indented)."""
    blocks = re.findall(rf"^([ \t]*)```{lang}\n(.*?)^[ \t]*```", text, flags=re.S | re.M)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) + "\n" for indent, body in blocks]


def _compose_commands(text: str) -> list[str]:
    lines = (line.strip() for block in _blocks(text, "bash") for line in block.splitlines())
    return [line for line in lines if line.startswith("audiomoe compose")]


def _component_sections(text: str) -> list[str]:
    return re.split(r"^## ", text, flags=re.M)[1:]


COMPONENTS_TEXT = COMPONENTS.read_text(encoding="utf-8")
README_TEXT = README.read_text(encoding="utf-8")


def test_every_component_section_has_a_runnable_example():
    sections = _component_sections(COMPONENTS_TEXT)
    assert len(sections) >= 8  # encoder, fusion, adapter, router, expert, moe, backbone, head
    for section in sections:
        assert "```" in section, f"section '{section.splitlines()[0]}' of docs/components.md has no example"
    assert len(_compose_commands(COMPONENTS_TEXT)) >= 8


@pytest.mark.parametrize("command", _compose_commands(COMPONENTS_TEXT) + _compose_commands(README_TEXT))
def test_compose_commands_run(command, capsys):
    assert main(shlex.split(command, comments=True)[1:]) == 0
    assert "parameters" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("code", _blocks(COMPONENTS_TEXT, "python"), ids=lambda c: c.splitlines()[1][:40])
def test_components_python_examples_run(code):
    exec(compile(code, str(COMPONENTS), "exec"), {})


@pytest.fixture
def template_plugin_registry(monkeypatch):
    """The process-wide registry holding the built-ins plus examples/plugin-template's plugin (not pip-installed)."""
    import audiomoe.core.registry as registry_module

    monkeypatch.syspath_prepend(str(PLUGIN_TEMPLATE))
    import acme_router

    monkeypatch.setattr(registry_module, "_default", registry_module.Registry.isolated(acme_router))
    yield
    for name in [n for n in sys.modules if n == "acme_router" or n.startswith("acme_router.")]:
        del sys.modules[name]


def test_readme_has_python_examples():
    assert len(_blocks(README_TEXT, "python")) >= 1


@pytest.mark.parametrize("code", _blocks(README_TEXT, "python"), ids=lambda c: c.splitlines()[-1][:40])
def test_readme_python_examples_run(code, template_plugin_registry):
    exec(compile(code, str(README), "exec"), {})


def test_readme_is_short():
    lines = len(README_TEXT.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.S | re.M)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def test_pages_have_links():
    assert len(_links(README)) >= 7  # one per docs page at least


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(page):
    broken = []
    for link in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto: are not checked offline
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no heading '#{anchor}' in {path.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"
