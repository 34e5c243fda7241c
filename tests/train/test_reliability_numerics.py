"""Issue 24, numerics: no checkpoint ever holds NaN or inf, and a tensor that never gets a gradient is named.

The models are real composed models with real plugin components: each plugin here is a real
distribution on ``sys.path`` (``install_dist``), found by the registry as a pip-installed one is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import audiomoe
from audiomoe.train import CheckpointError, TrainConfig, load_checkpoint, load_trainer_state, save_checkpoint, train

NANBACK = '''
"""An MLP expert whose forward stays finite but whose backward turns NaN after a few training forwards."""
import torch
from pydantic import Field
import audiomoe
from audiomoe.experts.mlp import MLPExpert


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a plugin's broken custom gradient."""

    @staticmethod
    def forward(ctx, w):
        return w.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


class NaNBack(MLPExpert):
    """The MLP times a learned gain; from training forward ``good + 1`` on, the gain's gradient is NaN."""

    class Params(MLPExpert.Params):
        good: int = Field(2, ge=0, description="training forwards with a finite backward")

    def __init__(self, params, *, d_model, d_ff=None):
        super().__init__(params, d_model=d_model, d_ff=d_ff)
        self.gain = torch.nn.Parameter(torch.ones(d_model))
        self.calls = 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
        bad = self.training and self.calls > self.params.good
        return super().forward(x) * (_NaNGrad.apply(self.gain) if bad else self.gain)


class DeafRouter(audiomoe.Router):
    """A top-1 router whose gate never reaches the loss: it picks by the logits, then weighs every pick 1."""

    def __init__(self, params, *, d_model, num_experts):
        super().__init__(params)
        self.gate = torch.nn.Linear(d_model, num_experts, bias=False)

    def forward(self, inputs, item_mask=None, task_ids=None):
        from audiomoe.routers.functional import make_routing

        logits = self.gate(inputs).detach()  # the mistake: no gradient can flow back to the gate
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, logits.argmax(-1, keepdim=True), True)
        if item_mask is not None:
            mask &= item_mask[:, None]
        return make_routing(logits, mask, mask.float(), item_mask=item_mask)


@audiomoe.hookimpl
def audiomoe_register_components(register):
    register("expert", "nanback", "numerics_plugin:NaNBack", "an MLP expert whose backward turns NaN")
    register("router", "deaf", "numerics_plugin:DeafRouter", "a router whose gate gets no gradient")
'''
FAST = dict(batch_size=4, eval_batches=0, progress=False, data="tones")


@pytest.fixture
def plugin(install_dist):
    install_dist("numerics-plugin", "1.0.0", {"numerics": "numerics_plugin"}, {"numerics_plugin": NANBACK})
    assert audiomoe.get_registry().plugins["numerics"].status == "loaded"


def _nan_expert(good: int) -> list[str]:
    # every routed expert of both layers is the plugin's, one layer: each is called once per training forward
    return [
        "backbone.moe.expert=nanback",
        f"backbone.moe.expert.good={good}",
        "backbone.moe.expert.d_ff=32",
        "backbone.num_layers=1",
    ]


def _all_finite(path: Path) -> bool:
    weights = load_file(str(path / "model.safetensors")).values()
    return all(torch.isfinite(t).all() for t in weights if t.is_floating_point())


def test_a_nan_gradient_stops_naming_the_step_the_parameter_and_the_last_good_checkpoint(plugin, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(steps=6, out_dir=str(out), save_every=1, **FAST)
    with pytest.raises(audiomoe.AudioMoEError) as exc:
        train("tiny-moe-cls", _nan_expert(good=3), cfg)
    msg = str(exc.value)
    assert "gradient norm became nan at step 4" in msg, msg
    assert "the first parameter with a non-finite gradient is 'backbone.blocks.0.moe.experts.0.gain'" in msg, msg
    assert f"the last good checkpoint is {out / 'step-000003'}" in msg and "optim.on_nonfinite=skip" in msg
    # latest stays on the last good step, whose every tensor is finite, and it loads and resumes
    assert (out / "latest").read_text().strip() == "step-000003" and not (out / "step-000004").exists()
    assert _all_finite(out / "step-000003")
    load_checkpoint(out)
    resumed = train(None, (), TrainConfig(steps=5, out_dir=str(out), resume=True, **FAST))  # a fresh plugin: good again
    assert resumed["start_step"] == 3 and resumed["skipped_steps"] == 0 and _all_finite(out / "step-000005")


def test_skip_mode_skips_every_bad_step_counts_them_and_keeps_the_weights_finite(plugin, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(steps=5, out_dir=str(out), logs=True, **FAST)
    result = train("tiny-moe-cls", _nan_expert(good=2) + ["optim.on_nonfinite=skip"], cfg)  # as --set on the CLI
    assert result["skipped_steps"] == 3 and result["steps"] == 5
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 3
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in steps if r.get("skipped")]
    assert skipped == [3, 4, 5] and all(r["grad_norm"] is None for r in steps if r.get("skipped"))
    assert sum("optimizer step was skipped" in w["warning"] for w in result["warnings"]) == 3
    model = load_checkpoint(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the two good steps moved the weights; the skipped ones did not touch them
    assert (out / "latest").read_text().strip() == "step-000005" and _all_finite(out / "step-000005")


def test_on_nonfinite_is_a_recipe_option_checked_like_the_others(tmp_path):
    with pytest.raises(audiomoe.AudioMoEError, match="on_nonfinite"):
        train("tiny-cls", ["optim.on_nonfinite=ignore"], TrainConfig(steps=1, **FAST))
    with pytest.raises(audiomoe.AudioMoEError, match=r"on_nonfinite \('ignore'\) must be one of stop, skip"):
        train("tiny-cls", (), TrainConfig(steps=1, on_nonfinite="ignore", **FAST))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {preset: tiny-cls}\ndata: tones\nbatch_size: 2\neval: {batches: 0}\n"
        "optim: {on_nonfinite: skip}\nstages: [{name: one, steps: 1}]\n"
    )
    from audiomoe.train.recipe import load_recipe

    assert load_recipe(str(recipe)).optim.on_nonfinite == "skip"
    assert load_recipe(str(recipe), ["optim.on_nonfinite=stop"]).optim.on_nonfinite == "stop"


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_a_state_with_nan_or_inf_is_never_written_and_latest_keeps_the_good_one(tmp_path, where):
    model = audiomoe.compose("tiny-cls")
    opt = torch.optim.AdamW(model.parameters())
    model(audiomoe.AudioBatch(torch.randn(2, 4000), 16000, "cls", targets=[0, 1])).loss.backward()
    opt.step()
    good = save_checkpoint(model, tmp_path, 10, opt)
    name, p = next(iter(model.named_parameters()))
    with torch.no_grad():
        if where == "model":
            p[0] = float("inf")
            bad = f"model tensor '{name}'"
        else:
            opt.state[p]["exp_avg"][0] = float("nan")
            bad = "optimizer-state tensor 'optimizer.state.0.exp_avg'"
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(model, tmp_path, 20, opt)
    assert str(exc.value) == (
        f"refusing to write step 20 in '{tmp_path}': {bad} holds NaN or inf; "
        f"the previous checkpoint {good.name} is intact"
    )
    assert sorted(x.name for x in tmp_path.iterdir()) == ["latest", "step-000010"]  # no temp dir, no step-20
    assert load_trainer_state(tmp_path)["step"] == 10 and _all_finite(good)


def test_a_router_whose_gate_gets_no_gradient_is_named_but_not_a_head_whose_task_was_absent(plugin, tmp_path):
    out = tmp_path / "run"
    # only emotion items: the speaker head legitimately gets no gradient and must not be named
    only_emotion = [audiomoe.AudioBatch(torch.randn(2, 4000), 16000, "emotion", targets=[0, 1]) for _ in range(4)]
    cfg = TrainConfig(steps=4, batch_size=2, eval_batches=0, progress=False, out_dir=str(out), logs=True)
    with pytest.warns(RuntimeWarning, match=r"never had an item for head\(s\) \['speaker'\]"):
        result = train("tiny-moe-cls", ["backbone.moe.router=deaf"], cfg, data=only_emotion)
    (warn,) = [w["warning"] for w in result["warnings"] if "got no gradient" in w["warning"]]
    assert warn.startswith(
        "2 trainable tensor(s) got no gradient (none, or exactly zero) in each of the first 3 steps "
        "of stage 'train': backbone.blocks.0.moe.router.gate.weight, "
        "backbone.blocks.1.moe.router.gate.weight."
    ), warn
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"step": 3, "warning": warn} in logged
    # the same model with the gate frozen does not train it on purpose: nothing to warn about
    frozen = tmp_path / "frozen.yaml"
    frozen.write_text(
        "model: {preset: tiny-moe-cls, overrides: [backbone.moe.router=deaf]}\ndata: tones\n"
        "batch_size: 4\neval: {batches: 0}\nstages: [{name: one, steps: 3, freeze: [router]}]\n"
    )
    from audiomoe.train.recipe import load_recipe
    from audiomoe.train.trainer import RunOptions, run_recipe

    quiet = run_recipe(load_recipe(str(frozen)), RunOptions(progress=False))
    assert not [w for w in quiet["warnings"] if "got no gradient" in w["warning"]]
