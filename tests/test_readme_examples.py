"""The README's examples run: every `audiomoe compose` line of the component sections and the Python examples there."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from audiomoe.cli import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
FAMILIES = README[README.index("## Component families") : README.index("## Data")]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", FAMILIES, flags=re.S)


COMMANDS = [line.split("  #")[0].strip() for b in _blocks("bash") for line in b.splitlines() if line.startswith("audiomoe compose")]


def test_every_component_section_has_a_runnable_example():
    sections = re.split(r"\n### ", FAMILIES)[1:]
    assert len(sections) >= 8  # encoder, fusion, adapter, router, expert, moe, backbone, head
    for section in sections:
        assert "```" in section, f"section '{section.splitlines()[0]}' has no example"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_compose_commands_run(command, capsys):
    assert main(shlex.split(command)[1:]) == 0
    assert "parameters" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("code", _blocks("python"))
def test_readme_python_examples_run(code):
    exec(compile(code, "README.md", "exec"), {})
