"""UniMoE stage 2: the MoE built from dense specialists (routed experts = FFN slices, the rest averaged)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import audiomoe
from audiomoe.train import load_checkpoint
from audiomoe.train.recipe import load_recipe
from audiomoe.train.specialists import build_from_specialists, dense_overrides
from audiomoe.train.trainer import RunOptions, run_recipe


def _specialists(n: int, seeds=(11, 12, 13, 14)):
    spec = audiomoe.compose("tiny-unimoe").spec
    dense = dense_overrides(spec, n)
    return [audiomoe.compose("tiny-unimoe", dense + [f"seed={s}"]) for s in seeds[:n]], dense


def test_dense_overrides_make_a_one_expert_block_as_wide_as_the_slices():
    _, dense = _specialists(2)
    assert dense == [
        "backbone.moe.num_experts=1",
        "backbone.moe.num_null=0",
        "backbone.moe.num_shared=0",
        "backbone.moe.router=top_k",
        "backbone.moe.router.k=1",
        "backbone.moe.expert.d_ff=128",
    ]  # 8 experts x 32 / 2
    sp = _specialists(2)[0][0]
    moe = sp.backbone.blocks[0].moe
    assert moe.experts.num_experts == 1 and moe.shared is None and moe.experts.d_ff == 128
    x = torch.randn(5, 32)
    y, routing = moe(x[None])
    assert torch.allclose(y[0], moe.experts.expert_forward(0, x), atol=1e-6)  # the block is dense: weight exactly 1


@pytest.mark.parametrize("n", [2, 4])
def test_routed_experts_are_the_specialists_ffn_slices_and_attention_the_average(n):
    specialists, _ = _specialists(n)
    fresh = audiomoe.compose("tiny-unimoe")
    model = audiomoe.compose("tiny-unimoe")
    report = build_from_specialists(model, specialists, owners=[["emotion"], ["speaker"]] + [[]] * (n - 2))
    slices, f = 8 // n, 32
    for i, block in enumerate(model.backbone.blocks):
        ex = block.moe.experts
        for e in range(8):
            dense = specialists[e // slices].backbone.blocks[i].moe.experts
            j = e % slices
            rows = torch.arange(j * f, (j + 1) * f)
            full = dense.d_ff
            assert torch.equal(
                ex.gate_up_proj[e], torch.cat([dense.gate_up_proj[0][rows], dense.gate_up_proj[0][full + rows]])
            )
            assert torch.equal(ex.down_proj[e], dense.down_proj[0][:, rows])
        x = torch.randn(7, 32)
        for s in range(n):  # SwiGLU splits over its hidden units: the slices of specialist s add up to its FFN
            whole = specialists[s].backbone.blocks[i].moe.experts.expert_forward(0, x)
            parts = sum(ex.expert_forward(s * slices + j, x) for j in range(slices))
            assert torch.allclose(parts, whole, atol=1e-5)
        for name in ("attn.qkv.weight", "attn.out.bias", "norm1.weight", "norm2.weight"):
            mod, avg = (
                dict(block.named_parameters())[name],
                torch.stack([dict(sp.backbone.blocks[i].named_parameters())[name] for sp in specialists]).mean(0),
            )
            assert torch.equal(mod, avg), name
        for name, p in block.moe.named_parameters():  # gates and shared experts: fresh
            if not name.startswith("experts."):
                assert torch.equal(p, dict(fresh.backbone.blocks[i].moe.named_parameters())[name]), name
    enc = torch.stack([sp.encoder.out.weight for sp in specialists]).mean(0)
    assert torch.equal(model.encoder.out.weight, enc)
    assert torch.equal(model.heads.emotion.head.weight, specialists[0].heads.emotion.head.weight)  # its owner's head
    assert torch.equal(model.heads.speaker.head.weight, specialists[1].heads.speaker.head.weight)
    assert report["heads_from"] == {"emotion": 0, "speaker": 1} and report["specialists"] == n


def test_specialists_of_the_wrong_shape_are_refused_with_what_to_do():
    model = audiomoe.compose("tiny-unimoe")
    wide = [audiomoe.compose("tiny-unimoe", dense_overrides(model.spec, 2)) for _ in range(2)]
    with pytest.raises(
        audiomoe.AudioMoEError, match="FFN width 128 .* is not 2 slices x 32 .*set its expert d_ff to 64"
    ):
        build_from_specialists(model, wide + wide)  # 4 specialists need 2 slices (width 64), these have 128
    with pytest.raises(audiomoe.AudioMoEError, match="has no dense FFN"):
        build_from_specialists(model, [audiomoe.compose("tiny-unimoe")] * 2)
    with pytest.raises(audiomoe.AudioMoEError, match="8 routed experts cannot be split evenly over 3 specialists"):
        dense_overrides(model.spec, 3)


def test_the_curriculum_trains_specialists_then_warms_up_gates_on_the_moe_built_from_them(tmp_path):
    recipe = load_recipe(
        {
            "name": "mini-curriculum",
            "model": {"preset": "tiny-unimoe"},
            "data": "tones",
            "batch_size": 8,
            "eval": {"batches": 1, "every": 2},
            "stages": [
                {
                    "name": "specialists",
                    "steps": 2,
                    "specialists": {
                        "members": [
                            {"name": "emo", "data": {"tasks": ["emotion"]}},
                            {"name": "spk", "data": {"tasks": ["speaker"]}},
                        ]
                    },
                },
                {
                    "name": "warmup",
                    "steps": 2,
                    "init": {"from_specialists": ["stage:specialists"]},
                    "train": ["router", "shared_experts"],
                },
                {"name": "joint", "steps": 1, "aux_weight": {"start": 0.025, "end": 0.001}},
            ],
        }
    )
    out = tmp_path / "run"
    summary = run_recipe(recipe, RunOptions(out_dir=str(out), progress=False, device="cpu"))
    assert [s["member"] for s in summary["stages"][0]["specialists"]] == ["emo", "spk"]
    assert summary["stages"][1]["init"]["heads_from"] == {
        "emotion": 0,
        "speaker": 1,
    }  # from each specialist's tasks_seen
    sp = [load_checkpoint(out / "specialists" / m) for m in ("emo", "spk")]
    assert sp[0].backbone.blocks[0].moe.experts.num_experts == 1
    after_warmup = load_file(
        str(out / "step-000002" / "model.safetensors")
    )  # warm-up trains only gates + shared experts
    gu = after_warmup["backbone.blocks.1.moe.experts.gate_up_proj"]
    dense = sp[1].backbone.blocks[1].moe.experts.gate_up_proj[0]
    assert torch.equal(gu[4], torch.cat([dense[0:32], dense[128:160]]))  # expert 4 = specialist 1, slice 0
    assert torch.equal(after_warmup["heads.speaker.head.weight"], sp[1].heads.speaker.head.weight.detach())
    assert summary["steps"] == 3 and (out / "step-000003").is_dir()
    again = run_recipe(
        None,
        RunOptions(
            out_dir=str(out),
            resume=True,
            progress=False,
            device="cpu",
            adjust=lambda r: load_recipe(
                {
                    **r.model_dump(),
                    "stages": [*r.model_dump()["stages"][:2], {**r.model_dump()["stages"][2], "steps": 2}],
                }
            ),
        ),
    )
    assert (
        again["start_step"] == 3 and again["steps"] == 4 and [s["name"] for s in again["stages"]] == ["joint"]
    )  # specialists not retrained


def test_a_causal_lm_moe_is_built_from_dense_lm_specialists():
    """UniMoE-Audio's own case: a Qwen2-style LM upcycled; its routed experts are the dense LMs' FFN slices."""
    over = ["tasks.codec=null", "tasks.cls=classification", "tasks.cls.num_classes=3"]
    spec = audiomoe.compose("unimoe-audio-tiny", over).spec
    dense = dense_overrides(spec, 2)
    assert dense[-1] == "backbone.moe.expert.d_ff=128"  # 8 experts x 32 over 2 specialists: the LM's whole FFN
    specialists = [audiomoe.compose("unimoe-audio-tiny", over + dense + [f"seed={s}"]) for s in (3, 4)]
    model = audiomoe.compose("unimoe-audio-tiny", over)
    fresh = audiomoe.compose("unimoe-audio-tiny", over)
    build_from_specialists(model, specialists)
    for i, layer in enumerate(model.backbone.lm.model.layers):
        ex = layer.mlp.moe.experts
        for e in range(8):
            dense_ex = specialists[e // 4].backbone.lm.model.layers[i].mlp.moe.experts
            rows = torch.arange((e % 4) * 32, (e % 4 + 1) * 32)
            assert torch.equal(
                ex.gate_up_proj[e], torch.cat([dense_ex.gate_up_proj[0][rows], dense_ex.gate_up_proj[0][128 + rows]])
            )
            assert torch.equal(ex.down_proj[e], dense_ex.down_proj[0][:, rows])
        q = [sp.backbone.lm.model.layers[i].self_attn.q_proj.weight for sp in specialists]
        assert torch.equal(layer.self_attn.q_proj.weight, torch.stack(q).mean(0)) and not torch.equal(q[0], q[1])
        assert torch.equal(
            layer.mlp.moe.router.scorer.layers[0].weight,
            fresh.backbone.lm.model.layers[i].mlp.moe.router.scorer.layers[0].weight,
        )
