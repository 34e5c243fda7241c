"""One codec space (issue 27): one ``codec`` head writes speech and music, the task in its prompt, as UniMoE-Audio."""

from __future__ import annotations

import pytest
import torch

import audiomoe
from audiomoe.core.batch import AudioBatch
from audiomoe.heads.codec_lm import CodecHead

SMALL = [
    "tasks.codec.num_codebooks=4",
    "tasks.codec.codebook_size=16",
    "tasks.codec.delays=[0,1,2,3]",
    "tasks.codec.max_frames=6",
]
CODEC = "{name: codec, params: {num_codebooks: 4, codebook_size: 16, delays: [0, 1, 2, 3], max_frames: 6}}"
TWO_HEADS = ["tasks.codec=null", f"tasks.tts={CODEC}", f"tasks.text_to_music={CODEC}"]


def _batch(tasks: list[str], seed: int = 0) -> AudioBatch:
    g = torch.Generator().manual_seed(seed)
    wav = 0.1 * torch.randn(len(tasks), 8000, generator=g)
    codes = [[[(i + 3 * j + t) % 16 for t in range(5)] for j in range(4)] for i in range(len(tasks))]
    return AudioBatch(wav, 16000, tasks, None, codes, [{"text": "the cat sleeps"}] * len(tasks))


@pytest.mark.parametrize("preset", ["unimoe-audio-tiny", "unimoe-audio"])
def test_the_unimoe_presets_have_one_codec_head_for_speech_and_music(preset):
    from audiomoe.core.composer import resolve

    spec = resolve(preset).to_dict()  # the full-size preset needs local weights to build: its resolved spec
    assert list(spec["tasks"]) == ["codec"]  # one head, keyed once
    head = spec["tasks"]["codec"]["params"]
    assert set(head["tasks"]) == {"tts", "text_to_music"} and head["num_codebooks"] == 12 and not head["out_bias"]


def test_one_head_one_table_one_output_layer_serves_both_tasks():
    model = audiomoe.compose("unimoe-audio-tiny")
    assert model.task_names == ["tts", "text_to_music"] and list(model.heads.keys()) == ["codec"]
    assert model.heads["tts"] is model.heads["text_to_music"] is model.heads["codec"]
    assert "tts" in model.heads and "codec" in model.heads and "asr" not in model.heads
    assert sum(isinstance(m, CodecHead) for m in model.modules()) == 1
    head_keys = {k.split(".")[1] for k in model.state_dict() if k.startswith("heads.")}
    assert head_keys == {"codec"}
    head = model.heads["codec"]
    assert len(head.embed) == 12 and tuple(head.out.weight.shape) == (12 * 1027, 64) and head.out.bias is None
    assert tuple(head.task_embed.weight.shape) == (2, 64)


def test_the_shared_head_learns_from_both_tasks():
    """Each task alone sends gradient of a real size into the one embedding table and output layer; each task's
    token row gets gradient only from its own task's items."""
    model = audiomoe.compose("unimoe-audio-tiny", SMALL).eval()  # eval: no router jitter, so both passes are exact
    head = model.heads["codec"]
    grads = {}
    for task in ("tts", "text_to_music"):
        model.zero_grad(set_to_none=True)
        out = model(_batch([task, task]), predict=False)
        assert set(k for k in out.losses if k.startswith("task/")) == {f"task/{task}"}
        out.losses[f"task/{task}"].backward()
        grads[task] = {
            "out": head.out.weight.grad.norm().item(),
            "embed": sum(e.weight.grad.norm().item() for e in head.embed),
            "token": head.task_embed.weight.grad.norm(dim=1).tolist(),
        }
    for task, row in (("tts", 0), ("text_to_music", 1)):
        g = grads[task]
        assert g["out"] > 0.1 and g["embed"] > 1e-3, grads  # the loss is ~4 x ln 19: these are far from round-off
        assert g["token"][row] > 1e-4 and g["token"][1 - row] == 0.0, grads
    mixed = model(_batch(["tts", "text_to_music", "tts", "text_to_music"]), predict=False)
    assert {"task/tts", "task/text_to_music"} <= set(mixed.losses)


def test_the_task_token_changes_the_prediction_and_nothing_else_does():
    """Same audio, same template text: the task's token alone moves the codec logits and the greedy codes;
    without task tokens (control) the two tasks give the same prefix."""
    from audiomoe.core.decoding import positions_from_mask

    same = "tasks.codec.tasks={tts: 'x {text}', text_to_music: 'x {text}'}"
    model = audiomoe.compose("unimoe-audio-tiny", SMALL + ["tasks.codec.temperature=0", same]).eval()
    head, b = model.heads["codec"], _batch(["tts", "tts", "tts", "tts"])
    audio, pad, _, _ = model.adapt(b.waveforms, b.lengths, b.sample_rate)
    targets = head.make_targets(b.targets, model.device)
    with torch.no_grad():
        prefix = {t: head(audio, pad, b.prompts, model.backbone, task=t) for t in ("tts", "text_to_music")}
        assert torch.equal(prefix["tts"].embeds[:, 1:], prefix["text_to_music"].embeds[:, 1:])
        assert not torch.equal(prefix["tts"].embeds[:, :1], prefix["text_to_music"].embeds[:, :1])

        def logits(p):
            e = torch.cat([p.embeds, head.embed_frames(targets.inputs)], 1)
            mask = torch.cat([p.real, (~targets.padding_mask).long()], 1)
            h = model.backbone.decode(e, mask, positions_from_mask(mask)).hidden
            return head.frame_logits(h[:, p.embeds.shape[1] :])

        a, m = logits(prefix["tts"]), logits(prefix["text_to_music"])
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(m)) and (a[finite] - m[finite]).abs().max() > 0.05
        gen = {t: head.generate(prefix[t]) for t in prefix}
        assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(gen["tts"], gen["text_to_music"]))
        plain = audiomoe.compose("unimoe-audio-tiny", SMALL + ["tasks.codec.task_token=false", same]).eval()
        p3 = {t: plain.heads["codec"](audio, pad, b.prompts, plain.backbone, task=t) for t in prefix}
        assert torch.equal(p3["tts"].embeds, p3["text_to_music"].embeds)
    model.train()
    out = model(_batch(["tts", "text_to_music"]), predict=True)
    assert set(out.predictions) == {"tts", "text_to_music"} and all(
        p.shape[0] == 4 and 1 <= p.shape[1] <= 6 for ps in out.predictions.values() for p in ps
    )


def test_two_separate_heads_remain_possible_by_config():
    model = audiomoe.compose("unimoe-audio-tiny", TWO_HEADS)
    assert model.task_names == ["tts", "text_to_music"] and list(model.heads.keys()) == ["tts", "text_to_music"]
    assert model.heads["tts"] is not model.heads["text_to_music"] and model.heads["tts"].task_embed is None
    out = model(_batch(["tts", "text_to_music"]), predict=False)
    out.loss.backward()
    assert model.heads["tts"].out.weight.grad.norm() > 0.1 and model.heads["text_to_music"].out.weight.grad.norm() > 0.1


def test_a_task_served_twice_or_unknown_is_an_error_naming_it():
    with pytest.raises(audiomoe.AudioMoEError, match="task 'tts' is served by two heads, 'codec' and 'tts'"):
        audiomoe.compose("unimoe-audio-tiny", [f"tasks.tts={CODEC}"])
    head = audiomoe.compose("unimoe-audio-tiny", SMALL).heads["codec"]
    with pytest.raises(
        audiomoe.AudioMoEError, match=r"serves tasks \['tts', 'text_to_music'\] and was asked for task 'asr'"
    ):
        head._template("asr")
    with pytest.raises(audiomoe.ConfigError, match="tasks must name at least one task"):
        audiomoe.compose("unimoe-audio-tiny", ["tasks.codec.tasks={}"])
