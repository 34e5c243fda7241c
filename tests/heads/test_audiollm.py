"""AudioLLM head: soft-token placement and masks, training, generation, LoRA save/load, pretrained, errors."""

from __future__ import annotations

import pytest
import torch

import audiomoe
from audiomoe.backbones.hf_lm import byte_tokenizer
from audiomoe.core.batch import AudioBatch
from audiomoe.core.errors import AudioMoEError
from audiomoe.heads.audiollm import AudioLLM

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
D = 16


def _head(**params) -> AudioLLM:
    torch.manual_seed(0)
    return AudioLLM(AudioLLM.Params(**params), d_model=D)


def _audio(lengths, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), n, D, generator=g)
    pad = torch.arange(n)[None] >= torch.tensor(lengths)[:, None]
    return x, pad


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Héllo, wörld! 你好 \n\t🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(tok) == 260 and tok.decode(ids) == text
    assert tok.eos_token_id == 2 and tok.pad_token_id == 0


def test_soft_tokens_land_between_prompt_tokens_with_padding_on_both_sides():
    head = _head(lora=None)
    x, pad = _audio([2, 5])  # right-padded audio: 2 and 5 valid frames of 6
    out = head(x, pad, prompts=[{"mode": "qa", "question": "why?"}, {"mode": "qa", "question": "what is it, really?"}])
    targets = head.make_targets(["yes", "a dog"], x.device)
    batch = head.build_inputs(out, targets)
    tok, adapted = head.tokenizer, head.adapter(x)
    before, after = head.params.templates["qa"].split("{audio}")
    for i, (q, ans, n) in enumerate([("why?", "yes", 2), ("what is it, really?", "a dog", 5)]):
        pre = [tok.bos_token_id] + tok(before, add_special_tokens=False)["input_ids"]
        post = tok(after.format(question=q), add_special_tokens=False)["input_ids"]
        answer = tok(ans, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        total = len(pre) + n + len(post) + len(answer)
        left = batch.attention_mask.shape[1] - total
        # left-padded prompt: zeros first, then exactly the real tokens
        assert batch.attention_mask[i].tolist() == [0] * left + [1] * total
        assert batch.position_ids[i, left:].tolist() == list(range(total))
        # the audio soft tokens: only the valid frames, in order, right after the prefix text
        where = batch.audio_mask[i].nonzero().flatten().tolist()
        assert where == list(range(left + len(pre), left + len(pre) + n))
        assert torch.allclose(batch.inputs_embeds[i, where], adapted[i, :n])
        emb = head.lm.get_input_embeddings()
        text_pos = [j for j in range(left, left + total) if j not in where]
        ids = pre + post + answer
        assert torch.allclose(batch.inputs_embeds[i, text_pos], emb(torch.tensor(ids)))
        assert batch.labels[i].tolist() == [-100] * (left + len(pre) + n + len(post)) + answer
    # padding is harmless: each item's loss is the same alone and in the padded batch
    lm = head.lm
    logits = lm(
        inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits
    single = head.build_inputs(head(x[:1, :2], pad[:1, :2], prompts=[{"mode": "qa", "question": "why?"}]), targets[:1])
    alone = lm(
        inputs_embeds=single.inputs_embeds, attention_mask=single.attention_mask, position_ids=single.position_ids
    ).logits
    assert torch.allclose(logits[0, -alone.shape[1] :], alone[0], atol=1e-5)


def test_generation_returns_text_and_matches_unbatched_generation():
    head = _head()
    head.eval()
    x, pad = _audio([3, 6])
    prompts = [{"mode": "caption"}, {"mode": "qa", "question": "a longer question here?"}]
    texts = head.predict(head(x, pad, prompts=prompts))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    one = head.predict(head(x[:1, :3], pad[:1, :3], prompts=prompts[:1]))
    assert texts[0] == one[0]


def _train(head, steps, x, pad, answers, lr=0.02):
    opt = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = head.loss(head(x, pad), head.make_targets(answers, x.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_decreases_and_lora_adapters_save_load_and_reproduce(tmp_path):
    lora = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    head = _head(lora=lora)
    trainable = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("adapter.") for n in trainable)
    x, pad = _audio([4, 6])
    losses = _train(head, 15, x, pad, ["hi there", "bye"])
    assert losses[-1] < 0.5 * losses[0]
    head.eval()
    ref_out = head(x, pad)
    ref_loss = head.loss(ref_out, head.make_targets(["hi there", "bye"], x.device)).item()
    ref_text = head.predict(ref_out)
    saved = head.save_adapters(tmp_path / "adapters")
    assert (saved / "adapter_model.safetensors").is_file() and (saved / "audio_adapter.safetensors").is_file()
    assert (saved / "adapter_model.safetensors").stat().st_size < 200_000  # adapters only, not the LM
    fresh = _head(lora=lora)
    fresh.eval()
    assert fresh.loss(fresh(x, pad), fresh.make_targets(["hi there", "bye"], x.device)).item() != pytest.approx(
        ref_loss
    )
    fresh.load_adapters(saved)
    out = fresh(x, pad)
    assert fresh.loss(out, fresh.make_targets(["hi there", "bye"], x.device)).item() == pytest.approx(
        ref_loss, abs=1e-6
    )
    assert fresh.predict(out) == ref_text
    with pytest.raises(AudioMoEError, match="rank 8"):
        _head(lora={"r": 8}).load_adapters(saved)


def test_pretrained_lm_and_tokenizer_load_from_a_local_directory(tmp_path):
    head = _head(lora=None)
    head.lm.save_pretrained(tmp_path / "lm")
    head.tokenizer.save_pretrained(tmp_path / "lm")
    loaded = _head(pretrained=str(tmp_path / "lm"), lora={"r": 2, "targets": ["q_proj", "k_proj"]})
    ids = torch.tensor([[5, 6, 7, 8]])
    base = loaded.lm.get_base_model()
    assert torch.allclose(base(input_ids=ids).logits, head.lm(input_ids=ids).logits)
    x, pad = _audio([3])
    assert torch.isfinite(loaded.loss(loaded(x, pad), loaded.make_targets(["ok"], x.device)))
    with pytest.raises(AudioMoEError, match="does not exist"):
        _head(pretrained=str(tmp_path / "nowhere"))


def test_qwen_style_config_builds_and_trains():
    cfg = {
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    }
    head = _head(config=cfg, lora={"r": 2})
    x, pad = _audio([3, 5])
    losses = _train(head, 5, x, pad, ["abc", "de"])
    assert losses[-1] < losses[0]


def test_bad_inputs_are_clear_errors():
    head = _head(
        config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
        }
    )
    x, pad = _audio([4])
    cpu = torch.device("cpu")
    with pytest.raises(AudioMoEError, match="exceeds the LM's context of 64 positions"):
        head.loss(head(x, pad, prompts=[{"mode": "qa", "question": "why " * 20}]), head.make_targets(["yes"], cpu))
    with pytest.raises(AudioMoEError, match="exceeds the LM's context"):
        head.predict(head(x, pad, prompts=[{"mode": "qa", "question": "why " * 5}]))  # + max_new_tokens 32
    with pytest.raises(AudioMoEError, match="empty answer/transcript"):
        head.make_targets(["  "], cpu)
    with pytest.raises(AudioMoEError, match="prompt mode 'translate' has no template"):
        head.loss(head(x, pad), head.make_targets([{"answer": "x", "mode": "translate"}], cpu))
    with pytest.raises(AudioMoEError, match="needs the field 'question'"):
        head.loss(head(x, pad), head.make_targets([{"answer": "x", "mode": "qa"}], cpu))
    with pytest.raises(ValueError, match="must contain '\\{audio\\}' exactly once"):
        AudioLLM.Params(templates={"asr": "no audio slot"})
    with pytest.raises(ValueError, match="not both"):
        AudioLLM.Params(pretrained="/x", config={"model_type": "llama"})
    with pytest.raises(AudioMoEError, match=r"LoRA targets \['w_nope'\] are not modules"):
        _head(lora={"targets": ["w_nope"]})


def test_audiollm_inside_a_composed_model_with_prompts():
    model = audiomoe.compose("tiny-audiollm")
    wav = torch.randn(2, 4000) * 0.1
    batch = AudioBatch(
        wav,
        16000,
        "llm",
        torch.tensor([4000, 2500]),
        targets=["a dog barks", "yes"],
        prompts=[{"mode": "caption"}, {"mode": "qa", "question": "is it a dog?"}],
    )
    out = model(batch)
    assert torch.isfinite(out.loss) and len(out.predictions["llm"]) == 2
    assert all(isinstance(t, str) for t in out.predictions["llm"])
    # training-only form: template fields may ride on the targets; generation is skipped
    train_batch = AudioBatch(
        wav, 16000, "llm", targets=["a dog barks", {"answer": "yes", "mode": "qa", "question": "dog?"}]
    )
    out = model(train_batch, predict=False)
    assert "llm" not in out.predictions and torch.isfinite(out.loss)
    with pytest.raises(AudioMoEError, match="2 items but 1 prompts"):
        model(AudioBatch(wav, 16000, "llm", prompts=[{}]))
