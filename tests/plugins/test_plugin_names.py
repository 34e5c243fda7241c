"""Plugins and names: clashing names, empty plugins, kind typos, built-in-free registries, describe/list.

Third-party plugins here are real distributions (a ``*.dist-info`` with entry points on
``sys.path``, the ``install_dist`` fixture), found by pluggy through ``importlib.metadata``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
import warnings

import pytest
import yaml

import audiomoe
from audiomoe import AudioMoEError, ConfigError, PluginLoadError, Registry, UnknownComponentError
from audiomoe.cli import main

#: A plugin whose router is also called ``top_p`` (a different class), with a preset of its own.
CLASH_PLUGIN = """
import audiomoe

@audiomoe.hookimpl
def audiomoe_register_components(register):
    register("router", "top_p", "audiomoe.routers.scored:ScoredRouter", "acme's own top_p")

@audiomoe.hookimpl
def audiomoe_register_presets(register):
    register("acme-tiny", {
        "d_model": 16,
        "encoder": {"name": "conv_frontend", "params": {"dim": 16, "channels": 16}},
        "backbone": {"name": "moe_transformer", "params": {"num_layers": 1, "num_heads": 2, "moe": {"name": "moe", "params": {"router": "top_p"}}}},
        "tasks": {"cls": {"name": "classification", "params": {"num_classes": 3}}},
    }, "acme's preset, routed by acme's top_p")
"""


@pytest.fixture
def acme_clash(install_dist):
    """Install the clashing plugin as entry point ``acme`` of distribution ``acme-clash`` 2.0.0."""
    install_dist("acme-clash", "2.0.0", {"acme": "acme_clash"}, {"acme_clash": CLASH_PLUGIN})
    reg = audiomoe.get_registry()  # the process-wide registry: what every user of the env sees
    assert reg.plugins["acme"].status == "loaded"
    assert [e.plugin for e in reg.list_components("router", "top_p")] == ["acme", "builtin"]
    return reg


def _routers(model) -> list:
    return [m for m in model.modules() if getattr(getattr(m, "audiomoe_component", None), "kind", None) == "router"]


def _which(router) -> tuple[str, str, str]:
    """Class, selector class and plugin: the built-in top_p preset picks by top-p, acme's top_p class by top-k."""
    return type(router).__name__, type(router.selector).__name__, router.audiomoe_component.plugin


BUILTIN_TOP_P, ACME_TOP_P = ("ScoredRouter", "TopP", "builtin"), ("ScoredRouter", "TopK", "acme")


# -- a clash never changes what a preset builds -----------------------------------------------


def test_builtin_preset_composes_with_a_clashing_plugin_installed(acme_clash, capsys):
    model = audiomoe.compose("tiny-unimoe")
    routers = _routers(model)
    assert routers and all(_which(r) == BUILTIN_TOP_P for r in routers)
    assert type(routers[0]).__module__ == "audiomoe.routers.scored"
    # The recorded spec names the clashing component qualified, so it recomposes as it is.
    assert model.spec["backbone"]["params"]["moe"]["params"]["router"]["name"] == "builtin:top_p"
    again = audiomoe.compose(model.spec)
    assert all(_which(r) == BUILTIN_TOP_P for r in _routers(again))
    # The same through the command line, for everyone in the environment.
    assert main(["compose", "tiny-unimoe", "--no-probe"]) == 0
    assert "router/builtin:top_p" in capsys.readouterr().out


def test_override_inside_a_preset_keeps_the_presets_provider(acme_clash):
    # Walking into the router (a Params default of the built-in backbone) resolves it as built-in.
    model = audiomoe.compose("tiny-unimoe", ["backbone.moe.router.p=0.6"])
    assert all(_which(r) == BUILTIN_TOP_P for r in _routers(model))
    assert model.spec["backbone"]["params"]["moe"]["params"]["router"]["params"]["selector"]["params"]["p"] == 0.6


def test_plugin_preset_means_the_plugins_own_component(acme_clash):
    model = audiomoe.compose("acme-tiny")
    assert [_which(r) for r in _routers(model)] == [ACME_TOP_P]
    assert _routers(model)[0].audiomoe_component.plugin == "acme"
    # Its built-in parts (no clash) still resolve: a plugin's preset may use any provider's names.
    assert model.encoder.audiomoe_component.plugin == "builtin"


def _suggestions(message: str, name: str) -> list[str]:
    return re.findall(rf"'([^' ]+:{name})'", message)


def test_a_clashing_name_typed_by_the_user_is_an_error_whose_suggestions_work(acme_clash):
    with pytest.raises(ConfigError) as err:
        audiomoe.compose("tiny-unimoe", ["backbone.moe.router=top_p"])
    msg = str(err.value)
    assert "backbone.moe.router" in msg and "more than one plugin: acme 2.0.0, builtin" in msg
    assert "(2.0.0):" not in msg and "builtin (" not in msg  # the old, unusable suggestion
    suggested = _suggestions(msg, "top_p")
    assert suggested == ["acme:top_p", "builtin:top_p"]
    expected = {"acme:top_p": ACME_TOP_P, "builtin:top_p": BUILTIN_TOP_P}
    for name in suggested:  # pasted back, each one works
        routers = _routers(audiomoe.compose("tiny-unimoe", [f"backbone.moe.router={name}"]))
        assert {_which(r) for r in routers} == {expected[name]}
    # describe and the CLI give the same advice, and it works there too.
    with pytest.raises(audiomoe.AmbiguousComponentError) as err2:
        audiomoe.describe("router", "top_p")
    for name in _suggestions(str(err2.value), "top_p"):
        assert audiomoe.describe("router", name)["plugin"] == name.split(":")[0]


def test_a_clashing_name_in_a_users_config_file_is_an_error(acme_clash, tmp_path):
    typed = tmp_path / "typed.yaml"
    typed.write_text("preset: tiny-unimoe\nbackbone: {params: {moe: {params: {router: top_p}}}}\n")
    with pytest.raises(ConfigError, match=r"backbone.moe.router.*'acme:top_p' or 'builtin:top_p'"):
        audiomoe.compose(str(typed))
    # A file that starts from the preset and changes other keys keeps the preset's names.
    other = tmp_path / "other.yaml"
    other.write_text("preset: tiny-unimoe\nbackbone: {params: {num_layers: 1}}\n")
    model = audiomoe.compose(str(other))
    assert {r.audiomoe_component.plugin for r in _routers(model)} == {"builtin"}
    # A mapping typed by the user has no preset to defer to.
    spec = dict(audiomoe.get_registry().get_preset("acme-tiny").spec)
    with pytest.raises(ConfigError, match="more than one plugin"):
        audiomoe.compose(spec)


def test_swapping_the_parent_gives_the_new_parents_defaults_back_to_their_author(acme_clash):
    # The user names the backbone; the router inside it is the backbone's Params default.
    model = audiomoe.compose("tiny-moe-cls", ["backbone=unimoe_transformer", "backbone.num_heads=2"])
    assert {r.audiomoe_component.plugin for r in _routers(model)} == {"builtin"}


def test_list_shows_both_providers_qualified(acme_clash, capsys):
    assert main(["list", "router", "top_p"]) == 0
    out = capsys.readouterr().out
    assert "acme:top_p" in out and "builtin:top_p" in out


# -- a plugin that registers nothing --------------------------------------------------------------


def test_shadowed_plugin_warns_naming_where_its_module_came_from(install_dist, tmp_path):
    """A same-named package in the working directory shadows the installed plugin."""
    install_dist("acme-shadow", "1.4.0", {"shadow": "acme_shadow"}, {"acme_shadow": CLASH_PLUGIN})
    site = tmp_path / "site"
    work = tmp_path / "work"
    (work / "acme_shadow").mkdir(parents=True)
    (work / "acme_shadow" / "__init__.py").write_text("# the user's own scratch package\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOMOE_")}
    env["PYTHONPATH"] = str(site)
    out = subprocess.run(
        [sys.executable, "-m", "audiomoe.cli", "plugins"], cwd=work, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    shadow = str(work / "acme_shadow" / "__init__.py")
    assert "plugin 'shadow' (acme-shadow 1.4.0) loaded but registered 0 components and 0 presets" in out.stderr
    assert f"imported from {shadow}" in out.stderr and "working directory" in out.stderr
    assert re.search(r"^shadow\s+acme-shadow\s+1\.4\.0\s+empty\b", out.stdout, re.M), out.stdout
    # From another directory the same installation is fine.
    ok = subprocess.run(
        [sys.executable, "-m", "audiomoe.cli", "plugins"], cwd=site, env=env, capture_output=True, text=True
    )
    assert "registered 0 components" not in ok.stderr and re.search(r"^shadow .* loaded", ok.stdout, re.M)
    # Strict mode refuses it.
    strict = subprocess.run(
        [sys.executable, "-m", "audiomoe.cli", "list"],
        cwd=work,
        env={**env, "AUDIOMOE_STRICT_PLUGINS": "1"},
        capture_output=True,
        text=True,
    )
    assert strict.returncode == 2 and "strict mode" in strict.stderr and shadow in strict.stderr


def test_empty_namespace_folder_plugin_warns_and_strict_raises(install_dist, tmp_path, monkeypatch):
    # The entry point resolves to a folder without __init__.py (what a same-named folder in the
    # working directory gives when the real package is installed through an import hook).
    install_dist("acme-ns", "0.2.0", {"ns": "acme_ns_plugin"}, {})
    folder = tmp_path / "cwd"
    (folder / "acme_ns_plugin").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(folder))
    with pytest.warns(RuntimeWarning) as rec:
        reg = Registry()
    text = " ".join(str(w.message) for w in rec)
    assert "plugin 'ns' (acme-ns 0.2.0) loaded but registered 0 components and 0 presets" in text
    assert f"imported from {folder / 'acme_ns_plugin'} (a folder without __init__.py)" in text
    assert reg.plugins["ns"].status == "empty"
    sys.modules.pop("acme_ns_plugin", None)
    monkeypatch.setenv("AUDIOMOE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match=r"'ns' \(acme-ns 0.2.0\).*registered 0 components"):
        Registry()
    sys.modules.pop("acme_ns_plugin", None)


# -- kinds are declared: a typo is an error -------------------------------------------------------


def _plugin(name: str, src: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    exec("import audiomoe\n" + src, mod.__dict__)
    return mod


TYPO_KIND = """
@audiomoe.hookimpl
def audiomoe_register_components(register):
    register("routr", "my_router", "audiomoe.routers.scored:ScoredRouter", "")
"""


def test_a_plugin_registering_a_misspelled_kind_is_refused_with_a_suggestion(install_dist):
    with pytest.raises(PluginLoadError, match=r"unknown kind 'routr'\. Did you mean 'router'\?"):
        Registry.isolated(_plugin("typo_plugin", TYPO_KIND))
    install_dist("acme-typo", "0.1.0", {"typo": "acme_typo"}, {"acme_typo": "import audiomoe\n" + TYPO_KIND})
    with pytest.warns(
        RuntimeWarning, match=r"'typo' \(acme-typo 0.1.0\).*unknown kind 'routr'\. Did you mean 'router'"
    ):
        reg = Registry()
    assert "routr" not in reg.kinds() and reg.plugins["typo"].status == "failed"


def test_list_and_describe_reject_a_misspelled_kind(capsys):
    with pytest.raises(UnknownComponentError, match=r"unknown kind 'routr'\. Did you mean 'router'\?"):
        audiomoe.list_components("routr")
    with pytest.raises(UnknownComponentError, match=r"unknown kind 'routr'\. Did you mean 'router'\?"):
        audiomoe.describe("routr", "top_p")
    assert main(["list", "routr"]) == 2
    assert main(["describe", "routr/top_p"]) == 2
    err = capsys.readouterr().err
    assert err.count("Did you mean 'router'?") == 2 and "Available: (none)" not in err


TYPO_SLOT = '''
from typing import Annotated
from pydantic import Field
import audiomoe
from audiomoe import ComponentSpec, Slot

class TypoTask(audiomoe.Task):
    """A task whose params declare a child of a misspelled kind."""

    class Params(audiomoe.Params):
        helper: Annotated[ComponentSpec, Slot("routr")] = Field(default_factory=lambda: ComponentSpec(name="top_p"))
'''


def test_a_slot_of_a_misspelled_kind_is_a_config_error_with_a_suggestion(install_dist):
    install_dist(
        "acme-slot",
        "0.1.0",
        {"slot": "acme_slot"},
        {
            "acme_slot": "import audiomoe\n@audiomoe.hookimpl\ndef audiomoe_register_components(register):\n"
            "    register('task', 'typo_task', 'acme_slot_task:TypoTask', '')\n",
            "acme_slot_task": TYPO_SLOT,
        },
    )
    with pytest.raises(ConfigError, match=r"tasks\.cls\.helper.*unknown kind 'routr'\. Did you mean 'router'\?"):
        audiomoe.core.composer.resolve("tiny-cls", ["tasks.cls=typo_task"])


NEW_KIND = """
@audiomoe.hookimpl
def audiomoe_register_kinds(register):
    register("decoder", "turns states into audio", default="acme_decoder")
    register("encoder", default="acme_conv")

@audiomoe.hookimpl
def audiomoe_register_components(register):
    register("decoder", "acme_decoder", "audiomoe.encoders.conv_frontend:ConvFrontend", "a decoder")
    register("encoder", "acme_conv", "audiomoe.encoders.conv_frontend:ConvFrontend", "acme's front-end")
    register("task", "acme_cls", "audiomoe.heads.classification:Classification", "acme's head")
"""


def test_a_declared_kind_and_its_default_work_without_the_builtins():
    reg = Registry.isolated(_plugin("acme_kinds", NEW_KIND), builtin=False)
    assert "decoder" in reg.kinds() and [e.name for e in reg.list_components("decoder")] == ["acme_decoder"]
    assert reg.get_component("decoder", None).plugin == "acme_kinds"
    spec = {
        "d_model": 16,
        "encoder": {"params": {"dim": 16, "channels": 16}},
        "tasks": {"cls": {"name": "acme_cls", "params": {"num_classes": 2}}},
    }
    model = audiomoe.compose(spec, registry=reg)  # the encoder slot names nothing: acme's default
    assert model.encoder.audiomoe_component.plugin == "acme_kinds" and model.spec["encoder"]["name"] == "acme_conv"
    # With the built-ins loaded, the built-in default wins: installing acme changes nothing.
    both = Registry.isolated(_plugin("acme_kinds", NEW_KIND))
    assert both.get_component("encoder", None).qualified_name == "builtin:conv_frontend"


def test_an_isolated_registry_without_builtins_has_no_builtin_defaults_components_or_presets():
    reg = Registry.isolated(builtin=False)
    assert reg.defaults == {} and reg.list_components() == [] and reg.list_presets() == []
    assert reg.kinds() == [
        "adapter",
        "backbone",
        "encoder",
        "expert",
        "fusion",
        "head",
        "moe",
        "router",
    ]  # the core kinds only ('task' became 'head'; the old name is an alias, not a kind)
    with pytest.raises(AudioMoEError, match="no encoder named and no loaded plugin gives a default encoder"):
        reg.get_component("encoder", None)
    with pytest.raises(ConfigError, match=r"encoder.*no loaded plugin gives a default encoder"):
        audiomoe.compose({"tasks": {"cls": {"name": "classification"}}}, registry=reg)
    with pytest.raises(UnknownComponentError, match="tiny-cls"):
        audiomoe.compose("tiny-cls", registry=reg)


# -- describe preset/NAME and list '*' GLOB --------------------------------------------------------


def test_describe_a_preset_shows_its_summary_plugin_and_spec(capsys):
    reg = audiomoe.get_registry()
    info = audiomoe.describe("preset", "tiny-unimoe")
    entry = reg.get_preset("tiny-unimoe")
    assert (info["kind"], info["plugin"], info["summary"], info["spec"]) == (
        "preset",
        "builtin",
        entry.summary,
        dict(entry.spec),
    )
    assert main(["describe", "preset/tiny-unimoe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("preset/tiny-unimoe  (plugin builtin") and entry.summary in out
    spec_text = out.split("spec:\n", 1)[1].split("\n\n", 1)[0]
    assert yaml.safe_load(spec_text) == dict(entry.spec)
    assert main(["describe", "preset/tiny-unimoe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"] == dict(entry.spec)


def test_describe_a_plugins_preset_by_qualified_name(acme_clash, capsys):
    assert main(["describe", "preset/acme:acme-tiny"]) == 0
    out = capsys.readouterr().out
    assert "(plugin acme 2.0.0)" in out and "acme's preset" in out and "router: top_p" in out
    assert main(["describe", "preset/no-such-preset"]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err


def test_list_star_searches_every_kind_and_presets(capsys):
    assert main(["list", "*", "*unimoe*"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()]
    assert ["backbone", "unimoe_transformer"] in rows
    assert ["preset", "tiny-unimoe"] in rows and ["preset", "mowe-unimoe-tiny"] in rows
    assert main(["list", "*", "top_p", "--json"]) == 0
    kinds = sorted(r["kind"] for r in json.loads(capsys.readouterr().out))
    assert kinds == ["router", "selector"]
    assert main(["list", "rout*"]) == 0 and "top_k" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["list", "x*"]) == 2
    assert "unknown kind 'x*'" in capsys.readouterr().err


def test_describe_renders_every_registered_component():
    """Defaults nested in lists (a mixture's weak encoders) render as YAML too; one crash here broke `describe`."""
    from audiomoe.core.describe import describe

    for entry in audiomoe.list_components():
        if entry.kind in ("encoder", "fusion", "adapter", "router", "expert", "moe", "task", "backbone"):
            info = describe(entry.kind, entry.name)
            assert info["example"].startswith(f"{entry.kind}:"), entry


#: A plugin whose backbone and preset names are also built-in names used by the built-in recipes.
RECIPE_CLASH_PLUGIN = """
import audiomoe

@audiomoe.hookimpl
def audiomoe_register_components(register):
    register("backbone", "unimoe_transformer", "audiomoe.backbones.transformer:TransformerBackbone", "acme's own backbone")

@audiomoe.hookimpl
def audiomoe_register_presets(register):
    register("mowe-tiny", {"d_model": 16, "encoder": {"name": "conv_frontend", "params": {"dim": 16, "channels": 16}},
                           "tasks": {"cls": {"name": "classification", "params": {"num_classes": 3}}}}, "acme's mowe-tiny")
"""


def test_builtin_recipes_mean_builtin_names_with_a_clashing_plugin_installed(install_dist, tmp_path):
    """A built-in recipe's preset and its preset_overrides resolve for builtin; the same names typed by a user are an error."""
    from audiomoe.train.recipe import load_recipe

    install_dist("acme-recipes", "1.0.0", {"acmer": "acme_recipes"}, {"acme_recipes": RECIPE_CLASH_PLUGIN})
    reg = audiomoe.get_registry()
    assert reg.plugins["acmer"].status == "loaded" and reg.providers("preset", "mowe-tiny") == ["acmer", "builtin"]
    spec = load_recipe("unimoe-curriculum-tiny").model.resolve().to_dict()
    assert spec["backbone"]["name"] == "builtin:unimoe_transformer"
    base_only = load_recipe("mowe-base-only-tiny")
    assert base_only.model.preset == "builtin:mowe-tiny"
    assert base_only.model.resolve().to_dict()["encoder"]["name"] == "whisper"
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "model: {preset: tiny-unimoe, overrides: [backbone=unimoe_transformer]}\nstages: [{name: a, steps: 1}]\n"
    )
    with pytest.raises(AudioMoEError, match="registered by more than one plugin"):
        load_recipe(str(mine)).model.resolve()


def test_a_name_of_a_plugin_not_loaded_here_says_so_instead_of_suggesting_another(install_dist, monkeypatch):
    """A checkpoint's spec naming `acme:top_p` with acme disabled (or not installed) names the missing plugin."""
    install_dist("acme-clash", "2.0.0", {"acme": "acme_clash"}, {"acme_clash": CLASH_PLUGIN})
    monkeypatch.setenv("AUDIOMOE_DISABLE_PLUGINS", "acme")
    audiomoe.reset_registry()
    for plugin, state in (("acme", "disabled"), ("nobody", "not installed")):
        with pytest.raises(ConfigError, match=f"comes from plugin '{plugin}', which is {state} here") as err:
            audiomoe.compose("tiny-unimoe", [f"backbone.moe.router={plugin}:top_p"])
        assert "Did you mean" not in str(err.value)
