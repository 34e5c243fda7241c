"""Plugin loading and the registry: lazy listing, broken plugins, conflicts, call order."""

from __future__ import annotations

import subprocess
import sys
import time
import types
import warnings

import pytest

import audiomoe
from audiomoe import AmbiguousComponentError, PluginLoadError, Registry, UnknownComponentError

ROUTER_PLUGIN = """
import audiomoe

@audiomoe.hookimpl
def audiomoe_register_components(register):
    register("router", "{name}", "audiomoe.routers.scored:ScoredRouter", "{summary}")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)


def test_import_and_listing_do_not_import_torch():
    out = _run(
        "import sys, audiomoe\n"
        "names = [e.name for e in audiomoe.list_components()]\n"
        "presets = [p.name for p in audiomoe.list_presets()]\n"
        "assert 'top_k' in names and 'tiny-moe-cls' in presets, (names, presets)\n"
        "from audiomoe.cli import main\n"
        "main(['list']); main(['list', 'router', '*top*']); main(['plugins'])\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    assert out.stdout.strip().endswith("NO-TORCH")


def test_cli_list_is_much_faster_than_importing_torch():
    # A ratio measured side by side, not an absolute time: listing must not pay for torch.
    def timed(args):
        t = time.perf_counter()
        subprocess.run(args, capture_output=True, check=True)
        return time.perf_counter() - t

    listing = min(timed([sys.executable, "-m", "audiomoe.cli", "list"]) for _ in range(3))
    torch_import = min(timed([sys.executable, "-c", "import torch"]) for _ in range(3))
    assert listing < 0.6 * torch_import, (listing, torch_import)


def test_unknown_component_suggests_and_lists():
    reg = Registry.isolated()
    with pytest.raises(UnknownComponentError) as err:
        reg.get_component("router", "top_kk")
    msg = str(err.value)
    assert "unknown router 'top_kk'" in msg
    assert "Did you mean 'top_k'" in msg
    available = msg.split("Available: ")[1].split(".")[0].split(", ")
    assert "top_k" in available and available == sorted(available)


def test_broken_plugin_is_skipped_with_a_warning_naming_it_and_its_version(install_dist):
    install_dist(
        "acme-broken",
        "0.3.1",
        {"broken": "acme_broken"},
        {"acme_broken": "import a_dependency_that_is_not_installed\n"},
    )
    install_dist(
        "acme-good",
        "1.2.0",
        {"good": "acme_good"},
        {"acme_good": ROUTER_PLUGIN.format(name="good_router", summary="ok")},
    )
    with pytest.warns(RuntimeWarning) as rec:
        reg = Registry()
    text = " ".join(str(w.message) for w in rec)
    assert "plugin 'broken' (acme-broken 0.3.1) failed to import and was skipped" in text
    assert "a_dependency_that_is_not_installed" in text
    assert reg.plugins["broken"].status == "failed"
    # The kit keeps working and the good plugin still loads.
    assert reg.get_component("router", "good_router").plugin == "good"
    # ... and the failure is pointed at when a name is missing.
    with pytest.raises(UnknownComponentError, match=r"failed to load.*broken \(acme-broken 0.3.1\)"):
        reg.get_component("router", "from_the_broken_plugin")


def test_strict_mode_raises_on_a_broken_plugin(install_dist, monkeypatch):
    install_dist("acme-broken", "0.3.1", {"broken": "acme_broken"}, {"acme_broken": "raise RuntimeError('boom')\n"})
    monkeypatch.setenv("AUDIOMOE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match=r"'broken' \(acme-broken 0.3.1\).*boom"):
        Registry()


def test_disable_env_var_skips_a_plugin_without_importing_it(install_dist, monkeypatch):
    install_dist("acme-broken", "0.3.1", {"broken": "acme_broken"}, {"acme_broken": "raise RuntimeError('boom')\n"})
    monkeypatch.setenv("AUDIOMOE_DISABLE_PLUGINS", "broken")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = Registry()
    assert reg.plugins["broken"].status == "disabled"


def test_plugin_whose_hook_raises_contributes_nothing():
    mod = types.ModuleType("half_plugin")

    @audiomoe.hookimpl
    def audiomoe_register_components(register):
        register("router", "first_ok", "audiomoe.routers.scored:ScoredRouter", "")
        raise ValueError("second registration failed")

    mod.audiomoe_register_components = audiomoe_register_components
    with pytest.warns(RuntimeWarning, match="half_plugin.*second registration failed"):
        reg = Registry([mod], entry_points=False, strict=False)
    with pytest.raises(UnknownComponentError):
        reg.get_component("router", "first_ok")


def test_registering_a_class_instead_of_an_import_string_is_refused():
    mod = types.ModuleType("eager_plugin")

    @audiomoe.hookimpl
    def audiomoe_register_components(register):
        register("router", "eager", object, "")

    mod.audiomoe_register_components = audiomoe_register_components
    with pytest.raises(PluginLoadError, match="must be an import string 'package.module:ClassName'"):
        Registry.isolated(mod)


def test_misspelled_hook_is_reported_with_a_suggestion():
    mod = types.ModuleType("typo_plugin")

    @audiomoe.hookimpl
    def audiomoe_register_component(register):  # missing "s"
        pass

    mod.audiomoe_register_component = audiomoe_register_component
    with pytest.raises(PluginLoadError, match="Did you mean 'audiomoe_register_components'"):
        Registry.isolated(mod)


def _router_plugin(plugin_name: str, router_name: str) -> types.ModuleType:
    mod = types.ModuleType(plugin_name)
    exec(ROUTER_PLUGIN.format(name=router_name, summary=f"from {plugin_name}"), mod.__dict__)
    return mod


def test_same_name_from_two_plugins_is_an_error_only_when_used():
    a, b = _router_plugin("plugin_a", "dup"), _router_plugin("plugin_b", "dup")
    reg = Registry.isolated(a, b)
    listed = [e.qualified_name for e in reg.list_components("router", "dup")]
    assert listed == ["plugin_a:dup", "plugin_b:dup"]  # recorded, listing fine
    with pytest.raises(AmbiguousComponentError) as err:
        reg.get_component("router", "dup")
    msg = str(err.value)
    assert "plugin_a" in msg and "plugin_b" in msg
    assert "'plugin_a:dup' or 'plugin_b:dup'" in msg
    assert reg.get_component("router", "plugin_b:dup").summary == "from plugin_b"
    # Unrelated names still work.
    assert reg.get_component("router", "top_k").plugin == "builtin"


def test_ambiguous_name_in_a_spec_names_both_providers_and_qualified_name_builds():
    reg = Registry.isolated(_router_plugin("plugin_a", "dup"), _router_plugin("plugin_b", "dup"))
    with pytest.raises(audiomoe.ConfigError, match=r"backbone.moe.router.*more than one plugin.*plugin_a:dup"):
        audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=dup"], registry=reg)
    model = audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=plugin_a:dup"], registry=reg)
    assert model.backbone.blocks[0].moe.router.audiomoe_component.plugin == "plugin_a"


def test_results_do_not_depend_on_registration_order():
    a, b = _router_plugin("plugin_a", "shared"), _router_plugin("plugin_b", "only_b")
    one, two = Registry.isolated(a, b), Registry.isolated(b, a)
    assert one.list_components() == two.list_components()
    assert one.get_component("router", "only_b") == two.get_component("router", "only_b")


def test_registry_yaml_is_loaded_safely_and_validated():
    from audiomoe.core.registry import load_registry_file

    data = load_registry_file()
    assert data.defaults["router"] == "top_k"
    for kind, entries in data.components.items():
        for name, line in entries.items():
            assert ":" in line.target, (kind, name)
    assert "tiny-moe-cls" in data.presets


def test_every_hook_is_documented_with_typed_args_and_an_example():
    import inspect
    from pathlib import Path

    from audiomoe.core import hookspecs

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    hooks = [f for n, f in vars(hookspecs).items() if n.startswith("audiomoe_register_")]
    assert len(hooks) == 3  # components, presets, kinds
    for fn in hooks:
        doc = inspect.getdoc(fn) or ""
        assert ":param register:" in doc and "Example::" in doc, fn.__name__
        assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(fn).parameters.values())
        assert fn.__name__ in readme, f"{fn.__name__} missing from the README's plugin section"


def test_a_broken_plugins_warning_is_one_line_on_the_command_line_and_strict_mode_says_it_stopped(install_dist):
    import os
    import subprocess
    import sys

    info = install_dist(
        "acme-broken",
        "0.3.1",
        {"broken": "acme_broken"},
        {"acme_broken": "import a_dependency_that_is_not_installed\n"},
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(info.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "audiomoe", "list", "router", "top_p"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0
    (line,) = [x for x in out.stderr.splitlines() if x.strip()]
    assert line.startswith(
        "audiomoe: plugin 'broken' (acme-broken 0.3.1) failed to import and was skipped: ModuleNotFoundError"
    )
    strict = subprocess.run(
        [sys.executable, "-m", "audiomoe", "list", "router"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "AUDIOMOE_STRICT_PLUGINS": "1"},
    )
    assert (
        strict.returncode != 0
        and "failed to import: ModuleNotFoundError" in strict.stderr
        and "skipped" not in strict.stderr
    )
    table = subprocess.run(
        [sys.executable, "-m", "audiomoe", "plugins"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "AUDIOMOE_STRICT_PLUGINS": "1"},
    )
    assert table.returncode == 0 and any(
        line.split()[:1] == ["broken"] and "failed" in line for line in table.stdout.splitlines()
    )


def test_the_old_kind_name_task_is_a_warning_alias_of_head():
    reg = audiomoe.get_registry()
    with pytest.warns(DeprecationWarning, match="kind 'task' is deprecated: use 'head'"):
        old = reg.list_components("task")
    assert old == reg.list_components("head") and {e.kind for e in old} == {"head"}
    with pytest.warns(DeprecationWarning, match="kind 'task' is deprecated"):
        assert reg.get_component("task", "classification") == reg.get_component("head", "classification")
    for _ in range(2):  # every use warns, not only the first (the lazy import must not cache the alias)
        with pytest.warns(DeprecationWarning, match=r"audiomoe\.Task is deprecated: subclass audiomoe\.Head"):
            assert audiomoe.Task is audiomoe.Head
    assert "task" not in reg.kinds() and "head" in reg.kinds()
