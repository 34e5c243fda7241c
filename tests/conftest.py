"""Shared fixtures: a clean process-wide registry per test, and real on-disk plugin distributions."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest

import audiomoe


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Each test sees installed plugins as they are now, with no env-var switches left over."""
    for var in ("AUDIOMOE_STRICT_PLUGINS", "AUDIOMOE_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    audiomoe.reset_registry()
    yield
    audiomoe.reset_registry()


@pytest.fixture
def install_dist(tmp_path, monkeypatch) -> Callable[..., Path]:
    """Install a real distribution on ``sys.path``: a ``*.dist-info`` with entry points, plus modules.

    This is what ``pip install`` leaves on disk; ``importlib.metadata`` (and so audiomoe's plugin
    discovery) finds it exactly as it finds a pip-installed package.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    added: list[str] = []

    def install(dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "[audiomoe]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(eps)
        for mod, src in modules.items():
            path = site / (mod.replace(".", "/") + ".py")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(src))
            added.append(mod.split(".")[0])
        importlib.invalidate_caches()
        return info

    yield install
    for mod in added:
        for name in [m for m in sys.modules if m == mod or m.startswith(mod + ".")]:
            del sys.modules[name]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny tensors: one intra-op thread avoids thread hand-off costs on a 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
