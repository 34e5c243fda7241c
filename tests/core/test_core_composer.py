"""The composer: validation with dotted keys, overrides, swaps, round-trips, injection."""

from __future__ import annotations

import pytest
import torch
import yaml

import audiomoe
from audiomoe import ConfigError
from audiomoe.core.composer import resolve


def _problems(source, overrides=()):
    with pytest.raises(ConfigError) as err:
        resolve(source, overrides)
    return err.value, str(err.value)


def test_unknown_component_in_a_spec_has_did_you_mean_and_available_names():
    _, msg = _problems("tiny-moe-cls", ["backbone.moe.router=top_kk"])
    assert "backbone.moe.router = 'top_kk': unknown router 'top_kk'. Did you mean " in msg
    assert "'top_k'" in msg.split("Did you mean")[1]
    assert "Available: " in msg and "top_k" in msg


def test_unknown_override_key_is_an_error_with_did_you_mean():
    _, msg = _problems("tiny-moe-cls", ["backbone.moe.router.kk=1"])
    assert "backbone.moe.router.kk" in msg and "unknown key 'kk'" in msg and "Did you mean 'k'?" in msg
    _, msg = _problems("tiny-moe-cls", ["bakbone.num_layers=1"])
    assert "unknown key 'bakbone'. Did you mean 'backbone'?" in msg


def test_bad_param_value_names_dotted_key_value_and_limit():
    _, msg = _problems("tiny-moe-cls", ["backbone.moe.router.k=0"])
    assert "backbone.moe.router.k = 0: Input should be greater than or equal to 1" in msg


def test_every_problem_is_reported_at_once():
    err, msg = _problems("tiny-moe-cls", ["backbone.moe.router.k=0", "tasks.emotion.num_classes=1", "d_model=-3"])
    assert "has 3 problems" in msg
    assert {p.key for p in err.problems} == {"backbone.moe.router.k", "tasks.emotion.num_classes", "d_model"}


def test_problems_in_a_yaml_file_and_in_a_mapping(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        yaml.safe_dump({"d_model": 32, "encoder": {"name": "conv_frontend", "params": {"chanels": 8}}, "tasks": {}})
    )
    err, msg = _problems(str(cfg))
    assert f"'{cfg}' has 2 problems" in msg
    assert "encoder.chanels = 8: unknown key 'chanels'. Did you mean 'channels'?" in msg
    assert "tasks = {}: a model needs at least one task head" in msg


def test_yaml_cannot_run_code(tmp_path):
    cfg = tmp_path / "evil.yaml"
    cfg.write_text("d_model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(audiomoe.AudioMoEError, match="not valid YAML"):
        resolve(str(cfg))


def test_overrides_change_params_and_swapping_resets_params():
    spec = resolve("tiny-moe-cls", ["backbone.moe.expert.d_ff=48", "backbone.moe.router.k=1"]).to_dict()
    assert spec["backbone"]["params"]["moe"]["params"]["expert"] == {
        "name": "mlp",
        "params": {"d_ff": 48, "activation": "gelu", "bias": True},
    }
    assert spec["backbone"]["params"]["moe"]["params"]["router"]["params"]["k"] == 1
    # Naming the component again swaps it in with the new component's defaults: no stale kwargs.
    spec = resolve("tiny-moe-cls", ["backbone.moe.expert.d_ff=48", "backbone.moe.expert=mlp"]).to_dict()
    assert spec["backbone"]["params"]["moe"]["params"]["expert"]["params"]["d_ff"] is None


def test_overrides_add_a_task_and_parse_yaml_values():
    spec = resolve(
        "tiny-cls",
        ["tasks.lang=classification", "tasks.lang.num_classes=5", "encoder.kernels=[8, 4]", "encoder.strides=[4, 4]"],
    ).to_dict()
    assert spec["tasks"]["lang"]["params"]["num_classes"] == 5
    assert spec["encoder"]["params"]["kernels"] == [8, 4]


def test_malformed_override_is_refused():
    with pytest.raises(audiomoe.AudioMoEError, match="must look like key=value"):
        resolve("tiny-cls", ["encoder.dim"])


def test_compose_resolved_spec_rebuilds_the_same_model(tmp_path):
    model = audiomoe.compose("tiny-moe-cls", ["backbone.moe.num_experts=6", "seed=7"])
    again = audiomoe.compose(model.spec)
    assert again.spec == model.spec
    a, b = model.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # Through a YAML file on disk, as `audiomoe compose --save-spec` writes it.
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(model.spec))
    from_file = audiomoe.compose(str(path))
    assert all(torch.equal(a[k], from_file.state_dict()[k]) for k in a)
    # A different seed gives different parameters with the same architecture.
    other = audiomoe.compose(model.spec, ["seed=8"])
    assert any(not torch.equal(a[k], other.state_dict()[k]) for k in a if a[k].is_floating_point())


def test_composing_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    audiomoe.compose("tiny-cls")
    assert torch.equal(torch.rand(3), expected)


def test_sizes_are_injected_not_configured():
    model = audiomoe.compose("tiny-moe-cls", ["d_model=48", "backbone.moe.num_experts=3"])
    moe = model.backbone.blocks[0].moe
    gate = moe.router.scorer.layers[0]
    assert gate.in_features == 48 and gate.out_features == 3
    assert len(moe.experts) == 3 and moe.experts[0].fc1.in_features == 48
    assert model.heads["emotion"].head.in_features == 48


def test_component_provenance_is_recorded():
    model = audiomoe.compose("tiny-moe-cls")
    info = model.backbone.blocks[1].moe.router.audiomoe_component
    assert (info.kind, info.name, info.plugin, info.path) == ("router", "top_k", "builtin", "backbone.moe.router")


def test_a_yaml_can_start_from_a_preset(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("preset: tiny-moe-cls\nbackbone:\n  params:\n    num_layers: 1\n")
    model = audiomoe.compose(str(cfg))
    assert len(model.backbone.blocks) == 1 and model.spec["backbone"]["params"]["moe"]["params"]["num_experts"] == 4


def test_model_refuses_a_task_it_has_no_head_for():
    model = audiomoe.compose("tiny-cls")
    batch = audiomoe.AudioBatch(torch.randn(2, 4000), 16000, ["cls", "asr"], targets=[0, "hello"])
    with pytest.raises(audiomoe.AudioMoEError, match=r"task\(s\) \['asr'\].*heads only for \['cls'\]"):
        model(batch)


def test_parameter_counts_total_and_active():
    model = audiomoe.compose("tiny-moe-cls", ["backbone.moe.router.k=1", "backbone.moe.num_experts=4"])
    total, active = audiomoe.count_parameters(model)
    expert = sum(
        p.numel() for p in model.backbone.blocks[0].moe.experts[0].parameters()
    )  # mlp experts: a per-expert loop
    assert total == sum(p.numel() for p in model.parameters())
    # Two MoE layers, each running 1 of 4 experts per token.
    assert total - active == pytest.approx(2 * 3 * expert)


def test_override_into_an_unwritten_slot_starts_from_that_slot_default():
    # top_p's selector slot defaults to the top_p selector, not to the registry's default selector.
    spec = resolve("tiny-moe-cls", ["backbone.moe.router=top_p", "backbone.moe.router.selector.p=0.5"]).to_dict()
    selector = spec["backbone"]["params"]["moe"]["params"]["router"]["params"]["selector"]
    assert selector["name"] == "top_p" and selector["params"]["p"] == 0.5


def test_dotted_overrides_reach_into_transformers_configs():
    """`--set backbone.config.num_hidden_layers=3` edits one key of the LM's config; the rest of it stays."""
    base = audiomoe.compose("unimoe-audio-tiny")
    model = audiomoe.compose(
        "unimoe-audio-tiny", ["backbone.config.num_hidden_layers=3", "encoder.config.encoder_layers=1"]
    )
    cfg = model.backbone.lm.config
    assert (
        cfg.num_hidden_layers == 3
        and len(model.backbone.lm.model.layers) == 3
        and base.backbone.lm.config.num_hidden_layers == 2
    )
    assert cfg.hidden_size == 64 and cfg.num_key_value_heads == 2  # untouched keys of the preset's config
    assert sum(type(m).__name__ == "MoELayer" for m in model.modules()) == 3  # every layer of the deeper LM upcycled
    assert model.encoder.model.config.encoder_layers == 1
    with pytest.raises(ConfigError, match="'config.hidden_size' is 64, not a mapping"):
        audiomoe.compose("unimoe-audio-tiny", ["backbone.config.hidden_size.x=3"])
    with pytest.raises(ConfigError, match="'d_model' is a plain value"):
        audiomoe.compose("unimoe-audio-tiny", ["d_model.x=3"])
