"""examples/plugin-template installed for real with pip into a temporary venv, found via its entry point."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "examples" / "plugin-template"


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory) -> str:
    """A venv that sees this environment's packages (torch, audiomoe) plus the pip-installed plugin."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    # See this interpreter's packages (torch, the editable audiomoe) whether or not it is itself a
    # venv: addsitedir also processes their .pth files, which a plain path line would not.
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
    Path(purelib, "_audiomoe_parent.pth").write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in parents))
    # pip from this interpreter, installing into the venv (no network needed: no build isolation).
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            py,
            "install",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(TEMPLATE),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return py


def _run(py: str, code: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOMOE_")}
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, cwd=str(ROOT.parent))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_installed_plugin_is_discovered_and_its_preset_composes(plugin_python):
    out = _run(
        plugin_python,
        "import audiomoe, torch\n"
        "reg = audiomoe.get_registry()\n"
        "rec = reg.plugins['acme']\n"
        "print(rec.status, rec.dist, rec.version)\n"
        "model = audiomoe.compose('acme-tiny-moe')\n"
        "r = model.backbone.blocks[0].moe.router\n"
        "print(type(r).__module__, r.audiomoe_component.plugin)\n"
        "batch = audiomoe.AudioBatch(torch.randn(2, 8000), 16000, 'cls', targets=[0, 2])\n"
        "model(batch).loss.backward()\n"
        "print('trained')\n",
    )
    assert "loaded audiomoe-acme-router 0.1.0" in out
    assert "acme_router.router acme" in out
    assert "trained" in out


def test_plugin_router_swaps_into_a_builtin_preset_and_conforms(plugin_python):
    out = _run(
        plugin_python,
        "import audiomoe\n"
        "from audiomoe.testing import check_component\n"
        "m = audiomoe.compose('tiny-moe-cls', ['backbone.moe.router=acme_temperature', 'backbone.moe.router.k=2'])\n"
        "print(m.spec['backbone']['params']['moe']['params']['router'])\n"
        "print(check_component('router', 'acme_temperature').checks[-1])\n",
    )
    assert "{'name': 'acme_temperature', 'params': {'k': 2}}" in out
    assert "gradients reach" in out


def test_plugin_is_invisible_outside_the_venv():
    import audiomoe

    assert "acme" not in audiomoe.get_registry().plugins
