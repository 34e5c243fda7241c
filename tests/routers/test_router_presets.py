"""Component presets: ``top_k``, ``top_p``, ... are ``scored`` with other defaults; ``linear_topk`` is an alias of ``top_k``.

The expected values are those of the classes the presets replaced (``audiomoe/routers/named.py``
and ``audiomoe/routers/linear_topk.py`` before the change), written out here by hand.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import yaml

import audiomoe
from audiomoe import ConfigError, PluginLoadError, Registry
from audiomoe.core.composer import component_builder, resolve
from audiomoe.core.registry_file import RegistryFile
from audiomoe.testing import build_component

#: ScoredRouter.Params defaults before the change (the old classes only changed some of them).
BASE = {
    "input_jitter": 0.0,
    "logit_noise": 0.0,
    "balance_weight": 0.01,
    "unimoe_aux_weight": 0.0,
    "unimoe_aux_weight_end": None,
    "unimoe_aux_steps": 10000,
    "unimoe_aux_schedule": "linear",
    "z_loss_weight": 0.0,
    "entropy_weight": 0.0,
}


def _spec(name: str, **params) -> dict:
    return {"name": name, "params": params}


#: Each old class's Params defaults (``Params().model_dump()``), from git's HEAD:audiomoe/routers/named.py.
OLD = {
    "scored": {**BASE, "scorer": _spec("linear"), "selector": _spec("top_k")},
    "top_k": {**BASE, "scorer": _spec("linear"), "selector": _spec("top_k", k=2), "k": None},
    "top_p": {
        **BASE,
        "scorer": _spec("linear"),
        "selector": _spec("top_p", p=0.7),
        "p": None,
        "balance_weight": 0.0,
        "unimoe_aux_weight": 0.025,
        "unimoe_aux_weight_end": 0.001,
    },
    "dense": {**BASE, "scorer": _spec("linear"), "selector": _spec("dense"), "balance_weight": 0.0},
    "mowe": {
        **BASE,
        "scorer": _spec("combined"),
        "selector": _spec("top_k", k=1, top1="raw"),
        "k": None,
        "balance_weight": 0.1,
    },
    "uniform": {**BASE, "scorer": _spec("uniform"), "selector": _spec("dense"), "balance_weight": 0.0},
    "random": {**BASE, "scorer": _spec("random"), "selector": _spec("top_k", k=2), "k": None, "balance_weight": 0.0},
    "oracle": {**BASE, "scorer": _spec("oracle"), "selector": _spec("top_k", k=1), "balance_weight": 0.0},
    "hash": {**BASE, "scorer": _spec("hash"), "selector": _spec("top_k", k=1), "balance_weight": 0.0},
}
CONTEXT = {"d_model": 16, "num_experts": 4, "task_names": ["a", "b"]}


def router(spec, **context):
    return component_builder("router", spec)(**{**CONTEXT, **context})


def _router_spec(spec) -> dict:
    """The router's entry in a model's resolved spec (a mapping, or a model's ``spec``)."""
    return getattr(spec, "spec", spec)["backbone"]["params"]["moe"]["params"]["router"]


# -- every preset has exactly the old class's defaults ---------------------------------------------


@pytest.mark.parametrize("name", sorted(OLD))
def test_each_preset_resolves_to_the_old_classes_defaults(name):
    node = component_builder("router", name).node
    assert type(node.params).__qualname__ == "ScoredRouter.Params" and node.name == name
    # the shortcuts k / p are on every preset now; the old classes without one had nothing there
    assert node.params.model_dump() == {"k": None, "p": None, **OLD[name]}
    entry = audiomoe.get_registry().get_component("router", name)
    assert (entry.preset_of, entry.target) == (
        "" if name == "scored" else "scored",
        "audiomoe.routers.scored:ScoredRouter",
    )


@pytest.mark.parametrize("name", sorted(OLD))
def test_a_spec_saved_by_the_old_classes_builds_the_same_router(name):
    old = {"name": name, "params": OLD[name]}  # what model.spec held for this router
    assert component_builder("router", old).node.to_dict() == component_builder("router", name).node.to_dict()
    torch.manual_seed(0)
    a = router(old).state_dict()
    torch.manual_seed(0)
    b = router(name).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_user_params_lie_over_the_preset_per_top_level_key():
    node = component_builder("router", _spec("hash", selector={"name": "top_k", "params": {"normalize": False}})).node
    # the user's selector replaces the preset's wholesale: k is top_k's own default again, not hash's 1
    assert node.params.selector.model_dump() == _spec("top_k", normalize=False)
    assert node.params.balance_weight == 0.0 and node.params.scorer.name == "hash"  # the rest stays the preset's
    assert component_builder("router", _spec("top_p", balance_weight=0.2)).node.params.balance_weight == 0.2


@pytest.mark.parametrize(
    "overrides, name, params",
    [
        (
            ["backbone.moe.router=top_k", "backbone.moe.router.selector.k=3"],
            "top_k",
            {"k": 3, "normalize": True, "top1": "raw"},
        ),
        (["backbone.moe.router=top_k", "backbone.moe.router.k=1"], "top_k", {"k": 1, "normalize": True, "top1": "raw"}),
        (
            ["backbone.moe.router=oracle", "backbone.moe.router.k=2"],
            "top_k",
            {"k": 2, "normalize": True, "top1": "raw"},
        ),
        (
            ["backbone.moe.router=scored", "backbone.moe.router.k=3"],
            "top_k",
            {"k": 3, "normalize": True, "top1": "raw"},
        ),
        (["backbone.moe.router=top_p", "backbone.moe.router.selector.p=0.5"], "top_p", {"p": 0.5, "min_experts": 1}),
        (["backbone.moe.router=top_p", "backbone.moe.router.p=0.6"], "top_p", {"p": 0.6, "min_experts": 1}),
    ],
)
def test_nested_overrides_and_shortcuts_reach_a_presets_selector(overrides, name, params):
    sel = _router_spec(resolve("tiny-moe-cls", overrides).to_dict())["params"]["selector"]
    assert sel["name"] == name and {k: sel["params"][k] for k in params} == params


def test_a_shortcut_the_selector_lacks_is_refused_under_the_selectors_key():
    with pytest.raises(ConfigError, match=r"backbone.moe.router.selector.*unknown key 'k'"):
        resolve("tiny-moe-cls", ["backbone.moe.router=dense", "backbone.moe.router.k=2"])


def test_the_spec_keeps_the_presets_name_and_rebuilds_the_same_model():
    model = audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=top_p"])
    spec = _router_spec(model)
    assert spec["name"] == "top_p" and spec["params"]["unimoe_aux_weight"] == 0.025
    assert spec["params"]["selector"]["params"]["p"] == 0.7 and "strict" in spec["params"]["selector"]["params"]
    again = audiomoe.compose(model.spec)
    assert again.spec == model.spec
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_describe_and_list_show_a_preset_and_whose_it_is(capsys):
    info = audiomoe.describe("router", "top_p")
    assert info["preset_of"] == "scored" and info["target"] == "audiomoe.routers.scored:ScoredRouter"
    assert info["doc"].startswith("Preset of router 'scored'") and info["problems"] == []
    defaults = {r["name"]: r["default"] for r in info["params"]}
    assert defaults["selector"] == _spec("top_p", p=0.7) and defaults["balance_weight"] == 0.0
    assert defaults["unimoe_aux_weight_end"] == 0.001 and defaults["entropy_weight"] == 0.0
    assert yaml.safe_load(info["example"])["router"]["params"]["unimoe_aux_weight"] == 0.025
    names = {e.name: e for e in audiomoe.list_components("router")}
    assert set(OLD) | {"linear_topk"} <= set(names) and names["mowe"].preset_of == "scored"
    from audiomoe.cli import main

    assert main(["describe", "router/top_p"]) == 0
    assert "Preset of router 'scored'" in capsys.readouterr().out


def test_the_default_router_is_top_k():
    assert audiomoe.get_registry().defaults["router"] == "top_k"
    layer = build_component("moe", "moe", {"num_experts": 4}, {"d_model": 16})
    assert layer.router.audiomoe_component.name == "top_k" and layer.router.selector.params.k == 2


# -- the same numbers as the old linear_topk ---------------------------------------------------------


def test_top_k_gives_the_old_linear_topk_weights_picks_and_balance_loss():
    torch.manual_seed(0)
    r = router(_spec("top_k", k=2, balance_weight=0.01), num_experts=6)
    x = torch.randn(40, 16)
    valid = torch.rand(40) > 0.2
    out = r(x, item_mask=valid)
    # LinearTopK by hand: p = softmax(x W^T), the 2 largest, renormalised; Switch E * sum_i f_i P_i * 0.01
    w_gate = r.scorer.layers[0].weight
    probs = (x @ w_gate.T).softmax(-1)
    top = probs.topk(2, dim=-1).indices
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top, True)
    weights = probs * mask / (probs * mask).sum(-1, keepdim=True)
    m, p = mask[valid].float(), probs[valid]
    balance = 0.01 * 6 * ((m.sum(0) / m.sum()) * p.mean(0)).sum()
    assert torch.equal(out.mask[valid], mask[valid]) and not out.mask[~valid].any()
    torch.testing.assert_close(out.weights[valid], weights[valid])
    assert set(out.aux_losses) == {"balance"}
    torch.testing.assert_close(out.aux_losses["balance"], balance)


# -- linear_topk: a deprecated alias of top_k ----------------------------------------------------------


def test_linear_topk_builds_warns_and_equals_top_k():
    with pytest.warns(DeprecationWarning, match=r"router 'linear_topk' is deprecated: it is 'top_k'"):
        node = component_builder("router", _spec("linear_topk", k=2)).node
    assert node.name == "top_k" and node.to_dict() == component_builder("router", _spec("top_k", k=2)).node.to_dict()
    x = torch.randn(12, 16)
    torch.manual_seed(3)
    with pytest.warns(DeprecationWarning):
        old = router("linear_topk")
    torch.manual_seed(3)
    new = router("top_k")
    assert old.audiomoe_component.name == "top_k"
    a, b = old(x), new(x)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.aux_losses["balance"], b.aux_losses["balance"])


def test_linear_topk_reads_its_old_params_and_says_so():
    old = _spec("linear_topk", k=1, normalize=True, top1="straight_through", aux_loss_weight=0.02)  # a 0.1 spec
    with pytest.warns(DeprecationWarning, match=r"'aux_loss_weight' as 'balance_weight'"):
        got = component_builder("router", old).node.to_dict()
    assert got["name"] == "top_k" and got["params"]["balance_weight"] == 0.02
    assert got["params"]["selector"] == _spec("top_k", k=1, normalize=True, top1="straight_through", dense_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = resolve(
            "tiny-moe-cls",
            [
                "backbone.moe.router=linear_topk",
                "backbone.moe.router.aux_loss_weight=0.3",
                "backbone.moe.router.normalize=false",
            ],
        ).to_dict()
    said = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert any("'aux_loss_weight' as 'balance_weight'" in m for m in said), said
    assert any("'normalize' as 'selector.normalize'" in m for m in said), said
    r = spec["backbone"]["params"]["moe"]["params"]["router"]
    assert r["name"] == "top_k" and r["params"]["balance_weight"] == 0.3
    assert r["params"]["selector"] == _spec("top_k", k=2, normalize=False, top1="raw", dense_steps=0)


def test_a_state_dict_of_the_old_linear_topk_loads():
    r = router("top_k")
    gate = torch.randn(4, 16)
    r.load_state_dict({"gate.weight": gate})  # LinearTopK's only tensor: nn.Linear(d_model, E, bias=False)
    assert torch.equal(r.scorer.layers[0].weight, gate) and int(r.step) == 0
    with pytest.raises(RuntimeError, match="Missing key"):
        r.load_state_dict({})  # the remap only reads the old layout; it never makes up a missing gate


def test_a_checkpoint_of_an_old_linear_topk_model_loads(tmp_path):
    from safetensors.torch import save_file

    from audiomoe.train.checkpoint import load_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=top_k"])
    spec = model.spec
    spec["backbone"]["params"]["moe"]["params"]["router"] = _spec(
        "linear_topk", k=2, normalize=True, top1="raw", aux_loss_weight=0.01
    )
    old_state = {}
    for key, value in model.state_dict().items():
        if key.endswith("router.step"):
            continue  # LinearTopK had no schedule buffer
        old_state[key.replace("router.scorer.layers.0.weight", "router.gate.weight")] = value.contiguous()
    assert sum(k.endswith("router.gate.weight") for k in old_state) == 2
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    save_file(old_state, str(tmp_path / "model.safetensors"))
    with pytest.warns(DeprecationWarning, match="linear_topk"):
        loaded = load_checkpoint(tmp_path)
    assert _router_spec(loaded)["name"] == "top_k"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# -- plugins register presets too; broken ones are reported where used ---------------------------------


def _plugin(name: str, *registrations: tuple) -> types.ModuleType:
    mod = types.ModuleType(name)

    @audiomoe.hookimpl
    def audiomoe_register_components(register):
        for args, kwargs in registrations:
            register(*args, **kwargs)

    mod.audiomoe_register_components = audiomoe_register_components
    return mod


def test_a_plugin_registers_a_preset_of_a_builtin_router():
    reg = Registry.isolated(_plugin("acme", (("router", "acme_top3"), {"preset_of": "top_k", "params": {"k": 3}})))
    entry = reg.get_component("router", "acme_top3")
    assert (entry.plugin, entry.class_plugin, entry.preset_of) == ("acme", "builtin", "top_k")
    node = component_builder("router", "acme_top3", reg).node
    assert node.name == "acme_top3" and node.params.selector.model_dump() == _spec("top_k", k=3)
    model = audiomoe.compose("tiny-moe-cls", ["backbone.moe.router=acme_top3"], registry=reg)
    assert model.backbone.blocks[0].moe.router.selector.params.k == 3
    assert _router_spec(audiomoe.compose(model.spec, registry=reg))["name"] == "acme_top3"


def test_a_preset_of_a_missing_or_looping_base_is_listed_but_refused_when_used():
    reg = Registry.isolated(
        _plugin(
            "acme",
            (("router", "orphan"), {"preset_of": "no_such_router"}),
            (("router", "loop_a"), {"preset_of": "loop_b"}),
            (("router", "loop_b"), {"alias_of": "loop_a"}),
        )
    )
    assert {"orphan", "loop_a", "loop_b"} <= {e.name for e in reg.list_components("router")}
    with pytest.raises(
        audiomoe.AudioMoEError, match=r"'orphan' \(plugin 'acme'\) is a preset of 'no_such_router'.*unknown router"
    ):
        reg.get_component("router", "orphan")
    with pytest.raises(audiomoe.AudioMoEError, match="loop"):
        reg.get_component("router", "loop_a")
    with pytest.raises(ConfigError, match="backbone.moe.router.*no_such_router"):
        resolve("tiny-moe-cls", ["backbone.moe.router=orphan"], reg)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("router", "x", "audiomoe.routers.scored:ScoredRouter"), {"preset_of": "top_k"}, "not a target"),
        (("router", "x"), {"preset_of": "top_k", "alias_of": "top_p"}, "not both"),
        (("router", "x", "audiomoe.routers.scored:ScoredRouter"), {"params": {"k": 2}}, "only a preset"),
        (("router", "x"), {"alias_of": "top_k", "params": {"k": 2}}, "only a preset"),
        (("router", "x"), {"preset_of": "top_k", "renamed_params": {"a": "b"}}, "belong to an alias"),
        (("router", "x"), {"preset_of": "top_k", "params": ["k"]}, "must be a mapping"),
    ],
)
def test_bad_preset_registrations_fail_the_plugin(args, kwargs, message):
    with pytest.raises(PluginLoadError, match=message):
        Registry.isolated(_plugin("bad", (args, kwargs)))


def test_the_registry_file_schema_checks_component_presets():
    line = {"target": "a.b:C", "presets": {"x": {"alias_of": "y", "params": {"k": 1}}}}
    with pytest.raises(ValueError, match="has no params of its own"):
        RegistryFile.model_validate({"components": {"router": {"c": line}}})
    twice = {"c": {"target": "a.b:C", "presets": {"d": {}}}, "d": {"target": "a.b:D"}}
    with pytest.raises(ValueError, match="'d' is listed twice"):
        RegistryFile.model_validate({"components": {"router": twice}})
    data = audiomoe.core.registry.load_registry_file()
    presets = data.components["router"]["scored"].presets
    assert set(presets) == set(OLD) - {"scored"} | {"linear_topk"} and presets["linear_topk"].alias_of == "top_k"
