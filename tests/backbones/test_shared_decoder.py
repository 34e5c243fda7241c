"""One model, one decoder: text and codec heads read the shared backbone, KV-cached generation, the paper presets."""

from __future__ import annotations

import pytest
import torch

import audiomoe
from audiomoe.core.batch import AudioBatch
from audiomoe.core.errors import MissingPretrainedError
from audiomoe.moe.layer import MoELayer
from audiomoe.testing import GRAD_TOL, build_component

GREEDY = ["tasks.tts.temperature=0", "tasks.tts.max_frames=12", "tasks.asr.max_new_tokens=10"]


def batch(model, tasks, seconds=(1.0, 0.6)):
    g = torch.Generator().manual_seed(0)
    n = int(16000 * max(seconds))
    wav = 0.1 * torch.randn(len(tasks), n, generator=g)
    lengths = torch.tensor([int(16000 * seconds[i % len(seconds)]) for i in range(len(tasks))])
    targets = [model.heads[t].example_targets(i + 1)[i] for i, t in enumerate(tasks)]
    return AudioBatch(wav, 16000, tasks, lengths, targets, prompts=[{"text": "say hi"}] * len(tasks))


def causal_lms(model):
    from transformers import GenerationMixin

    return [n for n, m in model.named_modules() if isinstance(m, GenerationMixin)]


def test_a_multitask_model_holds_exactly_one_llm():
    model = audiomoe.compose("mowe-unimoe-tiny", ["tasks.emotion=classification", "tasks.emotion.num_classes=4"])
    assert causal_lms(model) == ["backbone.lm"]
    assert sum(p.numel() for p in model.heads["asr"].parameters()) == 0  # the text head reads the LM's own tables
    codec = model.heads["tts"]
    # the codec head holds only its frame embeddings and its K x V output layer
    assert {n.split(".")[0] for n, _ in codec.named_parameters()} == {"embed", "out"}
    # and no head runs a decoder of its own: no attention anywhere outside the backbone
    assert not [n for n, _ in model.heads.named_modules() if "attn" in n.lower() or "transformer" in n.lower()]
    assert any("self_attn" in n for n, _ in model.backbone.named_modules())


def test_text_and_codec_targets_in_one_batch_both_train_the_same_llm():
    torch.manual_seed(0)
    model = audiomoe.compose("mowe-unimoe-tiny", GREEDY)
    out = model(batch(model, ["asr", "tts", "asr", "tts"]), predict=False)
    attn = [(n, p) for n, p in model.backbone.named_parameters() if "self_attn" in n and p.requires_grad]
    grads = {}
    for task in ("asr", "tts"):
        g = torch.autograd.grad(out.losses[f"task/{task}"], [p for _, p in attn], retain_graph=True, allow_unused=True)
        grads[task] = [0.0 if x is None else float(x.abs().max()) for x in g]
    # every attention tensor of the one LM learns from both tasks, with real magnitudes
    assert min(grads["asr"]) > GRAD_TOL and min(grads["tts"]) > GRAD_TOL, grads
    assert any(
        k.startswith("aux/heads/tts/decoder/layer0") for k in out.losses
    )  # the LM's MoE routes the codec sequence
    before = {n: p.detach().clone() for n, p in attn}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out.loss.backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in attn)


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("mowe-unimoe-tiny", []),
        (
            "tiny-cls",
            [
                "d_model=64",
                "encoder.dim=64",
                "backbone=moe_transformer",
                "backbone.positions=rope",
                "backbone.num_layers=2",
                "tasks.cls=null",
                "tasks.tts=codec",
                "tasks.tts.num_codebooks=3",
                "tasks.tts.codebook_size=16",
                "tasks.tts.temperature=0",
                "tasks.tts.max_frames=12",
            ],
        ),
    ],
)
def test_generation_with_the_kv_cache_equals_rerunning_the_sequence(preset, overrides):
    torch.manual_seed(0)
    model = audiomoe.compose(preset, overrides + (GREEDY[:2] if "mowe" in preset else [])).eval()
    wav = 0.1 * torch.randn(3, 16000)
    audio, pad, _, _ = model.adapt(wav, torch.tensor([16000, 9000, 12000]), 16000)  # padding: rows of unequal length
    for head in model.heads.values():
        inputs = head(
            audio, pad, prompts=[{"text": "hello"}, {"text": "a longer prompt"}, None], decoder=model.backbone
        )
        cached = head.generate(inputs)
        # a cached step of this small model runs the no-autograd dense dispatch, and generation takes no aux losses
        moes = [m for m in model.backbone.modules() if isinstance(m, MoELayer)]
        assert moes and {m.last_plan for m in moes} == {"dense"}
        assert all(not getattr(m, "routing", None) or not m.routing.aux_losses for m in model.backbone.modules())
        full = head.generate(inputs, use_cache=False)
        if isinstance(cached[0], torch.Tensor):
            assert [c.shape for c in cached] == [f.shape for f in full] and all(
                torch.equal(a, b) for a, b in zip(cached, full)
            )
            assert cached[0].shape[1] >= 1
        else:
            assert cached == full and any(cached)


@pytest.mark.parametrize(
    "name, params",
    [
        (
            "causal_lm",
            {"moe": {"name": "moe", "params": {"num_experts": 4, "router": "top_p", "num_null": 1, "num_shared": 1}}},
        ),
        ("moe_transformer", {"positions": "rope", "num_layers": 2}),
    ],
)
def test_decoding_step_by_step_equals_one_pass(name, params):
    torch.manual_seed(0)
    bb = build_component("backbone", name, params, {"d_model": 32}).eval()
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        whole = bb.decode(x, mask, pos).hidden
        state = bb.decode(x[:, :5], mask[:, :5], pos[:, :5])
        steps = [state.hidden]
        for t in range(5, 9):
            state = bb.decode(x[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1], state.cache)
            steps.append(state.hidden)
    torch.testing.assert_close(torch.cat(steps, 1)[mask.bool()], whole[mask.bool()], rtol=1e-4, atol=1e-5)
    assert state.routing and all(k.startswith("layer") for k in state.routing)


def test_heads_that_write_need_a_decoding_backbone_and_text_needs_a_tokenizer():
    with pytest.raises(audiomoe.AudioMoEError, match="writes through the model's shared decoder.*no backbone"):
        audiomoe.compose("tiny-cls", ["tasks.cls=null", "tasks.asr=text"])
    model = audiomoe.compose("tiny-cls", ["backbone=moe_transformer", "tasks.cls=null", "tasks.asr=text"])
    with pytest.raises(audiomoe.AudioMoEError, match="has no tokenizer; use a causal_lm backbone"):
        model(AudioBatch(0.1 * torch.randn(1, 8000), 16000, "asr", targets=["hi"]))


def test_paper_presets_have_the_published_layouts():
    model = audiomoe.compose("unimoe-audio-tiny")
    lm = model.backbone.lm
    inter = lm.config.intermediate_size
    for layer in lm.model.layers:
        moe = layer.mlp.moe
        assert (moe.num_experts, moe.num_null, moe.num_shared) == (8, 1, 2)
        assert moe.params.shared_mode == "gated" and moe.router.params.p == 0.7
        assert moe.experts.d_ff == inter // 4 and moe.shared.d_ff == inter // 8
    head = model.heads["tts"]
    assert len(head.sizes) == 12 and head.vocab == 1024 + 3 and head.delays == [0, *range(8, 19)]
    mowe = audiomoe.compose("mowe-audio-tiny")
    assert (
        type(mowe.encoder).__name__ == "MoWEMixture"
        and len(mowe.encoder.weak) == 4
        and causal_lms(mowe) == ["backbone.lm.base_model.model"]
    )
    assert {type(h).__name__ for h in mowe.heads.values()} == {"TextHead"}


@pytest.mark.parametrize("preset", ["unimoe-audio-tiny", "mowe-audio-tiny", "mowe-unimoe-tiny"])
def test_tiny_twins_train_a_step(preset):
    torch.manual_seed(0)
    model = audiomoe.compose(preset)
    tasks = (list(model.task_names) * 2)[:2]
    b = batch(model, tasks)
    if preset == "mowe-audio-tiny":  # the qa head's template asks a question
        b.prompts = [{"question": "what?"}] * 2
    out = model(b, predict=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "preset, expect",
    [
        ("unimoe-audio", ["encoder: ", "openai/whisper-large-v3", "backbone: ", "Qwen/Qwen2.5-3B"]),
        ("mowe-unimoe", ["5 of 5 encoders", "superb/hubert-base-superb-er", "backbone: ", "Qwen/Qwen2.5-3B"]),
        ("mowe-audio", ["5 of 5 encoders", "Qwen/Qwen2.5-1.5B-Instruct"]),
    ],
)
def test_full_size_presets_name_every_missing_checkpoint(preset, expect):
    with pytest.raises(MissingPretrainedError) as info:
        audiomoe.compose(preset)
    for text in expect:
        assert text in str(info.value)


@pytest.mark.parametrize("preset", ["unimoe-audio-tiny", "mowe-audio-tiny", "mowe-unimoe-tiny"])
def test_tiny_twins_validate_on_the_meta_device(preset, capsys):
    """`audiomoe validate` (and the trainer's size check) build on the meta device: upcycling must not touch values there."""
    from audiomoe.cli import main

    assert main(["validate", preset]) == 0
    assert "is valid and composes" in capsys.readouterr().err  # the resolved spec goes to stdout, the verdict to stderr
