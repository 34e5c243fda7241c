"""Beam search in the text head: exact on an exhaustive case, equal with and without the KV cache; cache row selection."""

from __future__ import annotations

import pytest
import torch

import audiomoe
from audiomoe.heads.beam import beam_search
from audiomoe.testing import build_component

BACKBONES = [
    (
        "causal_lm",
        {"moe": {"name": "moe", "params": {"num_experts": 4, "router": "top_p", "num_null": 1, "num_shared": 1}}},
    ),
    ("moe_transformer", {"positions": "rope", "num_layers": 2}),
]


def text_model(*over):
    torch.manual_seed(0)
    model = audiomoe.compose("mowe-unimoe-tiny", ["tasks.tts=null", *over]).eval()
    wav = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(1))
    audio, pad, _, _ = model.adapt(wav, torch.tensor([16000, 9000]), 16000)  # rows of unequal length: left padding
    head = model.heads["asr"]
    return model, head, head(audio, pad, decoder=model.backbone)


def test_beam_search_over_the_whole_vocabulary_finds_the_best_two_token_answer():
    """With as many beams as tokens, two steps are an exhaustive search: compare with scoring every sequence.

    A length penalty of 10 (score / length ** 10) makes two-token answers beat a lone eos, so the
    search has to rank all vocab x vocab continuations, where greedy decoding picks another answer.
    """
    lp = 10.0
    # seed 3: the random LM where greedy misses the best pair for both items (seeds 0, 1, 8, 10: it does not)
    model, head, inputs = text_model("seed=3", f"tasks.asr.length_penalty={lp}", "tasks.asr.max_new_tokens=2")
    dec, tok = model.backbone, model.backbone.tokenizer
    with torch.no_grad():
        batch = head.build_inputs(inputs)
        first = torch.log_softmax(
            dec.text_logits(dec.decode(batch.inputs_embeds, batch.attention_mask, batch.position_ids).hidden[:, -1]), -1
        )
        vocab, eos = first.shape[-1], tok.eos_token_id
        best, greedy = [], []
        for i in range(2):  # every (a, b): one decoder pass over the prefix + a, for all a at once
            rows = batch.inputs_embeds[i : i + 1].expand(vocab, -1, -1)
            ext = torch.cat([rows, dec.embed_tokens(torch.arange(vocab)[:, None])], 1)
            mask = torch.cat(
                [batch.attention_mask[i : i + 1].expand(vocab, -1), torch.ones(vocab, 1, dtype=torch.long)], 1
            )
            pos = torch.cat(
                [
                    batch.position_ids[i : i + 1].expand(vocab, -1),
                    batch.position_ids[i : i + 1, -1:].expand(vocab, 1) + 1,
                ],
                1,
            )
            second = torch.log_softmax(dec.text_logits(dec.decode(ext, mask, pos).hidden[:, -1]), -1)
            total = (first[i][:, None] + second) / 2**lp  # [a, b]: two tokens (b = eos: the answer "a", eos counted)
            total[eos] = float("-inf")  # after eos nothing follows: [eos] alone scores first[eos] / 1
            a, b = divmod(int(total.argmax()), vocab)
            best.append([] if first[i][eos] >= total.max() else [a] + ([] if b == eos else [b]))
            g = int(first[i].argmax())
            greedy.append([g] + ([] if int(second[g].argmax()) == eos else [int(second[g].argmax())]))
        ids = beam_search(
            dec,
            eos,
            batch.inputs_embeds,
            batch.attention_mask,
            batch.position_ids,
            limit=2,
            beams=vocab,
            length_penalty=lp,
        )
    assert ids == best and all(best)
    assert ids != greedy, "greedy decoding picks another answer here: the search itself is tested"
    assert head.generate(inputs, num_beams=vocab) == [tok.decode(q, skip_special_tokens=True).strip() for q in best]


def test_beam_search_with_the_cache_equals_rerunning_the_sequence_and_beams_1_is_greedy():
    model, head, inputs = text_model("tasks.asr.max_new_tokens=6")
    cached, full = head.generate(inputs, num_beams=3), head.generate(inputs, num_beams=3, use_cache=False)
    assert cached == full and len(cached) == 2 and any(cached)
    assert head.generate(inputs, num_beams=1) == head.generate(inputs)
    with pytest.raises(Exception, match="num_beams"):
        audiomoe.compose("mowe-unimoe-tiny", ["tasks.asr.num_beams=0"])


@pytest.mark.parametrize("name, params", BACKBONES)
def test_select_cache_keeps_and_repeats_rows(name, params):
    """A step after selecting rows [1, 1, 0] equals that step on the selected rows' own sequences."""
    torch.manual_seed(0)
    bb = build_component("backbone", name, params, {"d_model": 32}).eval()
    x = torch.randn(2, 7, 32)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    rows = torch.tensor([1, 1, 0])
    with torch.no_grad():
        state = bb.decode(x[:, :6], mask[:, :6], pos[:, :6])
        step = bb.decode(x[rows, 6:], mask[rows], pos[rows, 6:], bb.select_cache(state.cache, rows)).hidden
        whole = bb.decode(x[rows], mask[rows], pos[rows]).hidden[:, -1:]
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-5)
