"""The MoWE mixture: sparse execution, routing record, alignment, combine modes, presets."""

from __future__ import annotations

import pytest
import torch

import audiomoe
from audiomoe.core.batch import AudioBatch
from audiomoe.core.errors import AudioMoEError
from audiomoe.encoders.align import align_time, stack_frames
from audiomoe.encoders.hf_common import MissingPretrainedError
from audiomoe.testing import build_component

SR = 16000
WIN = {"config": {"max_source_positions": 50}}  # 1 s Whisper window: fast


def _mixture(combine: str = "concat", router=None, router_input: str = "pooled", **params):
    """A mixture of tiny encoders; ``combine`` names the fusion, ``router`` its router (one-router fusions)."""
    fusion = {"router_input": router_input}
    if combine != "mowe":
        fusion["router"] = router or {"name": "top_k", "params": {"k": 1}}
    spec = {
        "base": {"name": "whisper", "params": WIN},
        "weak": [
            {"name": "whisper", "params": {"window": "trim"}},
            {"name": "hubert"},
            {"name": "wavlm"},
            {"name": "hubert"},
        ],
        "fusion": {"name": combine, "params": fusion},
    }
    spec.update(params)
    return build_component("encoder", "mowe_mixture", spec, {"d_model": 16, "task_names": ["a"]})


def _count_calls(mix):
    calls = [0] * len(mix.weak)
    batch_sizes: list[list[int]] = [[] for _ in mix.weak]
    for k, enc in enumerate(mix.weak):

        def hook(_m, args, _out, k=k):
            calls[k] += 1
            batch_sizes[k].append(args[0].shape[0])

        enc.register_forward_hook(hook)
    return calls, batch_sizes


def test_only_selected_weak_encoders_run_on_their_samples():
    torch.manual_seed(0)
    mix = _mixture().eval()
    calls, sizes = _count_calls(mix)
    with torch.no_grad():  # force a known routing: samples 0, 2 -> weak 1; sample 1 -> weak 3
        mix.fusion.router.scorer.layers[0].weight.zero_()
        mix.fusion.router.scorer.layers[0].weight[1, 0] = 10.0
        mix.fusion.router.scorer.layers[0].weight[3, 0] = -10.0
        x = torch.randn(3, SR) * 0.1
        x[1] *= -1
        out = mix(x)
    r = out.routing["mowe"]
    chosen = r.indices[:, 0].tolist()
    for k in range(4):
        assert calls[k] == (1 if k in chosen else 0)
        if k in chosen:
            assert sizes[k] == [chosen.count(k)]  # each encoder saw only the samples that chose it
    assert r.mask.sum(1).tolist() == [1, 1, 1] and r.item_shape == (3,)
    assert out.features.shape == (3, 50, 2 * mix.base.output_dim)  # fused [h_b ; z] at the base frame rate


def test_zero_length_item_runs_no_weak_encoder_and_stays_padded():
    mix = _mixture().eval()
    calls, sizes = _count_calls(mix)
    with torch.no_grad():
        out = mix(torch.randn(2, SR) * 0.1, torch.tensor([SR, 0]))
    r = out.routing["mowe"]
    assert not r.mask[1].any() and r.mask[0].sum() == 1
    assert sum(calls) == 1 and sum(sum(s) for s in sizes) == 1
    assert out.padding_mask[1].all() and out.features[1].abs().sum() == 0


def test_unselected_contribution_is_zero_and_selected_is_weighted():
    """With the weak projections zeroed, the output equals the base-only path."""
    mix = _mixture(combine="sum").eval()
    x = torch.randn(2, SR) * 0.1
    with torch.no_grad():
        full = mix(x).features
        for proj in mix.proj:
            proj.weight.zero_()
            proj.bias.zero_()
        base_only = mix(x).features
    assert not torch.allclose(full, base_only)
    with torch.no_grad():
        torch.testing.assert_close(base_only, mix.base(x).features, atol=1e-6, rtol=0)


@pytest.mark.parametrize("combine", ["concat", "sum", "gated_sum", "mowe"])
@pytest.mark.parametrize("align", ["interpolate", "pool"])
def test_combine_and_align_modes_train(combine, align):
    mix = _mixture(combine=combine, align=align).train()
    out = mix(torch.randn(2, SR) * 0.1, torch.tensor([SR, SR // 3]), task_ids=torch.tensor([0, 0]))
    d_base = mix.base.output_dim
    assert mix.fusion.output_dim == mix.output_dim == {"concat": 2 * d_base, "mowe": 3 * d_base}.get(combine, d_base)
    assert out.features.shape == (2, 50, mix.output_dim)
    assert (~out.padding_mask).sum(1).tolist() == mix.num_frames(torch.tensor([SR, SR // 3])).tolist()
    loss = out.features.pow(2).mean() + sum(out.aux_losses.values())
    loss.backward()
    if combine == "mowe":  # two routers, two records, two balance terms; both routers learn
        assert {"mowe/independent", "mowe/dependent"} <= set(out.routing)
        assert {"router/independent/balance", "router/dependent/balance"} <= set(out.aux_losses)
        assert mix.fusion.independent.scorer.table.grad.abs().max() > 0
        assert mix.fusion.dependent.scorer.layers[0].weight.grad.abs().max() > 0
    else:
        assert "router/balance" in out.aux_losses
        assert mix.fusion.router.scorer.layers[0].weight.grad is not None


def test_router_aux_loss_is_weighted_by_the_mixture():
    a, b = _mixture(aux_loss_weight=0.1), _mixture(aux_loss_weight=1.0)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, SR) * 0.1
    la, lb = a(x).aux_losses["router/balance"], b(x).aux_losses["router/balance"]
    torch.testing.assert_close(la * 10, lb)


def test_weak_encoder_with_another_sample_rate_gets_resampled_audio():
    mix = _mixture(weak=[{"name": "conv_frontend", "params": {"sample_rate": 8000, "dim": 8}}])
    seen = []
    mix.weak[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        out = mix(torch.randn(2, SR) * 0.1)
    assert seen == [SR // 2] and torch.isfinite(out.features).all()


def test_align_time_interpolate_and_pool():
    # a ramp at 100 Hz onto 50 Hz: pooling averages pairs, interpolation samples the frame centre
    x = torch.arange(10.0)[None, :, None]
    pool = align_time(x, torch.tensor([10]), 100.0, 50.0, 5, "pool")
    assert pool.flatten().tolist() == [0.5, 2.5, 4.5, 6.5, 8.5]
    interp = align_time(x, torch.tensor([10]), 100.0, 50.0, 5, "interpolate")
    assert interp.flatten().tolist() == [0.5, 2.5, 4.5, 6.5, 8.5]
    # never reads past the valid frames; upsampling holds the last valid frame
    up = align_time(x, torch.tensor([3]), 25.0, 50.0, 8, "pool")
    assert up.flatten().tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    assert align_time(x, torch.tensor([0]), 50.0, 50.0, 4).abs().sum() == 0
    with pytest.raises(AudioMoEError, match="align mode"):
        align_time(x, torch.tensor([3]), 50.0, 50.0, 4, "nearest")


def test_stack_frames_masks():
    x = torch.arange(5.0)[None, :, None]
    pad = torch.tensor([[False, False, False, True, True]])
    s, p = stack_frames(x, pad, 2)
    assert s.shape == (1, 3, 2) and p.tolist() == [[False, False, True]]


def test_sum_with_other_width_is_refused():
    with pytest.raises(AudioMoEError, match="proj_dim"):
        _mixture(combine="sum", proj_dim=7)


def test_two_router_fusion_in_yaml_only_and_swapped_by_one_override(tmp_path):
    """The paper's [z_base ; z_indep ; z_dep] written in config alone; --set encoder.fusion=sum swaps it."""
    cfg = tmp_path / "mowe2.yaml"
    cfg.write_text(
        "preset: mowe-tiny\n"
        "encoder:\n  params:\n    fusion:\n      name: mowe\n      params:\n"
        "        dependent: {name: scored, params: {scorer: {name: mlp, params: {depth: 1}}, selector: {name: top_k, params: {k: 2}}}}\n"
    )
    model = audiomoe.compose(str(cfg))
    assert type(model.encoder.fusion).__name__ == "MoWETwoRouters" and model.encoder.fusion.dependent.k == 2
    batch = AudioBatch(torch.randn(2, SR) * 0.1, SR, ["emotion", "speaker"], targets=[0, 1])
    out = model(batch)
    assert {"encoder/mowe/independent", "encoder/mowe/dependent"} <= set(out.routing)
    swapped = audiomoe.compose(str(cfg), ["encoder.fusion=sum"])
    assert type(swapped.encoder.fusion).__name__ == "Sum"
    assert swapped.spec["encoder"]["params"]["fusion"]["name"] == "sum"


def test_mowe_router_with_sequence_inputs_and_task_ids():
    if "mowe" not in {e.name for e in audiomoe.list_components("router")}:
        pytest.skip("mowe router not registered")
    mix = _mixture(router={"name": "mowe", "params": {"balance_weight": 1.0}}, router_input="sequence")
    out = mix(torch.randn(3, SR) * 0.1, torch.tensor([SR, 4000, 0]), task_ids=torch.tensor([0, 0, 0]))
    r = out.routing["mowe"]
    assert r.mask.sum(1).tolist() == [1, 1, 0]


# -- presets ---------------------------------------------------------------------------------------


def test_mowe_tiny_composes_and_trains_a_step():
    model = audiomoe.compose("mowe-tiny")
    assert type(model.encoder).__name__ == "MoWEMixture" and len(model.encoder.weak) == 4
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, SR) * 0.1
    batch = AudioBatch(
        x, SR, ["emotion", "speaker", "emotion", "speaker"], torch.tensor([SR, 9000, 3000, SR]), [0, 1, 2, 3]
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(batch)
    assert torch.isfinite(out.loss) and "aux/encoder/router/balance" in out.losses
    out.loss.backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert any(n.startswith("adapter.") for n in changed) and type(model.adapter).__name__ == "StackMLPAdapter"
    r = out.routing["encoder/mowe"]
    assert r.mask.shape == (4, 4) and r.mask.sum(1).tolist() == [1, 1, 1, 1]


def test_mowe_audio_names_every_missing_checkpoint():
    with pytest.raises(MissingPretrainedError) as info:
        audiomoe.compose("mowe-audio")
    msg = str(info.value)
    assert "5 of 5 encoders have no local weights" in msg
    for where, name in [
        ("encoder.base", "openai/whisper-large-v3"),
        ("encoder.weak.0", "openai/whisper-tiny"),
        ("encoder.weak.2", "facebook/hubert-base-ls960"),
        ("encoder.weak.3", "superb/hubert-base-superb-er"),
    ]:
        assert f"{where}: " in msg and f"'{name}'" in msg


def test_mowe_audio_partial_cache_names_only_the_missing(tmp_path):
    """Point two weak slots at local checkpoints: the error lists the other three."""
    import transformers as T

    from audiomoe.encoders.ssl_base import TINY_SSL

    T.HubertModel(T.HubertConfig(**TINY_SSL)).save_pretrained(tmp_path / "hubert")
    overrides = [f"encoder.weak.2.pretrained={tmp_path / 'hubert'}", f"encoder.weak.3.pretrained={tmp_path / 'hubert'}"]
    with pytest.raises(MissingPretrainedError, match="3 of 5 encoders") as info:
        audiomoe.compose("mowe-audio", overrides)
    assert "hubert-base" not in str(info.value)


@pytest.mark.parametrize(
    "name, params, stride", [("linear", {}, 1), ("stack_mlp", {"stack": 3}, 3), ("conv", {"stride": 2, "kernel": 4}, 2)]
)
def test_adapters_map_width_and_rate_and_keep_padding(name, params, stride):
    torch.manual_seed(0)
    ad = build_component("adapter", name, params, {"in_dim": 12, "d_model": 8})
    assert ad.stride == stride
    x = torch.randn(2, 10, 12)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 4:] = True
    y, p = ad(x, pad)
    n_out = -(-10 // stride)
    assert y.shape == (2, n_out, 8) and p.shape == (2, n_out)
    assert (~p[1]).sum() == -(-4 // stride) and not p[0].any()  # valid frames follow the rate
    assert (y[p] == 0).all()
    x2 = x.clone()
    x2[1, 4:] = 50.0  # padded content never leaks into valid outputs
    torch.testing.assert_close(ad(x2, pad)[0][~p], y[~p])


def test_adapter_is_one_swap_in_a_preset():
    model = audiomoe.compose("mowe-tiny", ["adapter=conv", "adapter.stride=4", "adapter.kernel=4"])
    assert type(model.adapter).__name__ == "ConvAdapter"
    out = model(AudioBatch(torch.randn(2, SR) * 0.1, SR, ["emotion", "speaker"], targets=[0, 1]))
    assert torch.isfinite(out.loss)
    with pytest.raises(audiomoe.ConfigError, match="kernel=2 must be >= stride=4"):
        audiomoe.compose("mowe-tiny", ["adapter=conv", "adapter.stride=4", "adapter.kernel=2"])


def test_active_parameters_before_any_forward_count_the_routers_k_weak_encoders():
    """Before a forward the estimate is base + fusion + k average weak encoders (k from the fusion's router)."""
    model = audiomoe.compose("mowe-tiny")
    mix = model.encoder
    count = lambda m: sum(p.numel() for p in m.parameters())
    weak = [count(e) + count(p) for e, p in zip(mix.weak, mix.proj)]
    fixed = count(mix) - sum(weak)
    k = 1  # the mowe router picks one weak encoder per sample
    assert mix.num_active_parameters() == pytest.approx(fixed + sum(weak) * k / len(weak))
