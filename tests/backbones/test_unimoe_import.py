"""The whole released UniMoE-Audio checkpoint (issue 27): key map, strict import, reference logits, a usable run."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import audiomoe
from audiomoe.backbones.unimoe_import import load_released_state, spec_overrides
from audiomoe.core.decoding import positions_from_mask
from tests.helpers.unimoe_release import reference_codec_logits, released_state, tiny_config, write_release


def _kit_logits(model, prefix: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    head = model.heads["codec"]
    embeds = torch.cat([prefix[None], head.embed_frames(frames[None])], 1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    hidden = model.backbone.decode(embeds, mask, positions_from_mask(mask)).hidden
    return head.out(hidden)[0].view(embeds.shape[1], len(head.sizes), head.vocab)


def _inputs(config: dict, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prefix = 0.5 * torch.randn(5, config["text_config"]["hidden_size"], generator=g)
    frames = torch.randint(0, config["codec_vocab_size"], (7, config["codec_channels"]), generator=g)
    return prefix, frames


def test_the_released_layout_loads_strictly_and_reproduces_the_reference_logits():
    config, state = tiny_config(), released_state(tiny_config())
    model = audiomoe.compose("unimoe-audio-tiny", spec_overrides(config)).eval()
    report = load_released_state(model, state)
    lm_and_head = [k for k, t in model.state_dict().items() if k.startswith(("backbone.lm.", "heads.codec."))]
    weights = [k for k in lm_and_head if "task_embed" not in k and model.state_dict()[k].is_floating_point()]
    assert report["loaded"] == len(weights) and sorted(report["skipped"]) == sorted(
        k for k in state if k.startswith("visual.")
    )
    assert report["fresh"] == ["adapter", "encoder", "heads.codec.task_embed.weight"]
    prefix, frames = _inputs(config)
    with torch.no_grad():
        ref = reference_codec_logits(config, state, prefix, frames)
        got = _kit_logits(model, prefix, frames)
    assert ref.abs().mean() > 0.1  # logits of a real size, not a degenerate zero
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)
    # top-p really picks several experts for some tokens: the comparison covers the dynamic-capacity part
    mask = model.backbone.lm.model.layers[0].mlp.routing.mask
    assert int(mask[..., :8].sum(-1).max()) > 1


def test_in_memory_key_spelling_and_tied_lm_head_are_accepted():
    config = tiny_config(channels=4, codes=16, delays=[0, 1, 2, 3])
    state = released_state(config, seed=3)
    state = {("language_model." + k[6:] if k.startswith("model.") else k): v for k, v in state.items()}
    del state["lm_head.weight"]
    model = audiomoe.compose("unimoe-audio-tiny", spec_overrides(config))
    load_released_state(model, state)
    lm = model.backbone.lm
    assert torch.equal(lm.lm_head.weight, state["language_model.embed_tokens.weight"])
    assert torch.equal(lm.model.layers[1].self_attn.k_proj.bias, state["language_model.layers.1.self_attn.k_proj.bias"])


def test_a_layout_mismatch_or_a_missing_or_stray_key_is_an_error_naming_it():
    config = tiny_config(channels=4, codes=16, delays=[0, 1, 2, 3])
    model = audiomoe.compose("unimoe-audio-tiny", spec_overrides(config))
    state = released_state(config)
    with pytest.raises(
        audiomoe.AudioMoEError,
        match=r"released 'codec_embed_tokens.0.weight' has shape \(19, 64\) but 'heads.codec.embed.0.weight' is \(1027, 64\)",
    ):
        load_released_state(audiomoe.compose("unimoe-audio-tiny", spec_overrides(tiny_config())), state)
    bad = dict(state)
    del bad["model.layers.1.self_attn.o_proj.weight"]
    with pytest.raises(audiomoe.AudioMoEError, match=r"no value for \['backbone.lm.model.layers.1.self_attn.o_proj"):
        load_released_state(model, bad)
    with pytest.raises(audiomoe.AudioMoEError, match="released keys with no place in the model: \\['extra.w'\\]"):
        load_released_state(model, {**state, "extra.w": torch.zeros(1)})
    with pytest.raises(audiomoe.AudioMoEError, match="not a UniMoE-Audio config.json: it lacks \\['codec_channels'"):
        spec_overrides({k: v for k, v in config.items() if k != "codec_channels"})


def test_import_writes_a_run_that_predict_eval_and_fine_tuning_accept(tmp_path, monkeypatch):
    import subprocess
    import sys

    import audiomoe.data as data_pkg
    from audiomoe.data import make_corpus, read_manifest
    from audiomoe.train.checkpoint import load_checkpoint
    from audiomoe.train.evaluate import evaluate_checkpoint
    from audiomoe.train.predict import predict_files
    from audiomoe.train.recipe import Recipe
    from audiomoe.train.trainer import RunOptions, run_recipe

    config = tiny_config(channels=4, codes=16, delays=[0, 1, 2, 3])
    state = released_state(config, seed=5)
    release = write_release(tmp_path / "release", config, state)
    cmd = [sys.executable, "-m", "audiomoe", "import", "unimoe-audio", str(release), "--out", str(tmp_path / "run")]
    cmd += ["--preset", "unimoe-audio-tiny", "--set", "tasks.codec.max_frames=6"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "skipped 2 (visual.)" in done.stdout
    report = json.loads((tmp_path / "run" / "import.json").read_text())
    assert report["skipped"] == {"count": 2, "prefixes": ["visual."]}
    model = load_checkpoint(tmp_path / "run").eval()
    prefix, frames = _inputs(config, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(
            _kit_logits(model, prefix, frames),
            reference_codec_logits(config, state, prefix, frames),
            atol=2e-4,
            rtol=2e-4,
        )
    corpus = tmp_path / "corpus"
    make_corpus(corpus, "tiny", 0, progress=False)
    monkeypatch.setattr(data_pkg, "builtin_corpus", lambda progress=True, **_: corpus / "manifest.jsonl")
    monkeypatch.setenv("AUDIOMOE_CACHE", str(tmp_path / "cache"))
    clip = read_manifest(corpus / "manifest.jsonl", only_tasks=["speaker"])[0][0].audio
    rows = predict_files(str(tmp_path / "run"), [clip], prompt="a calm tune")
    assert [r["task"] for r in rows] == ["tts", "text_to_music"]
    assert all(r["prediction"].startswith("4 x ") and r["wav"] is None for r in rows)  # codes; no codec given
    report = evaluate_checkpoint(str(tmp_path / "run"), "builtin", split="train", max_items=2)
    assert set(report["tasks"]) == {"tts", "text_to_music"} and "code_accuracy" in report["tasks"]["tts"]
    spec = yaml.safe_load((tmp_path / "run" / "step-000000" / "spec.yaml").read_text())
    recipe = Recipe.model_validate(
        {
            "name": "finetune-import",
            "model": {"spec": spec},
            "data": "builtin",
            "batch_size": 4,
            "eval": {"every": 100, "batches": 0},
            "stages": [{"name": "finetune", "steps": 1, "init": {"from_checkpoint": str(tmp_path / "run")}}],
        }
    )
    summary = run_recipe(recipe, RunOptions(out_dir=str(tmp_path / "ft"), progress=False, device="cpu"))
    assert summary["steps"] == 1
    tuned = load_checkpoint(tmp_path / "ft")
    moved = {k for k, v in tuned.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert any(k.startswith("heads.codec.") for k in moved) and any(
        k.startswith("backbone.lm.model.layers") for k in moved
    )
