"""Text head: a thin reader of the shared LM backbone (MoWE-Audio's setting: one LLM answers every task by prompt).

The adapted audio frames (the model's one adapter already mapped them to the LM width) replace the
``{audio}`` slot of a per-mode template; the sequence ``[bos prompt-before | audio soft tokens |
prompt-after | answer eos]`` goes through the backbone's decoder once, and the backbone's own LM
head scores the answer: ``L = -mean_t log p(y_t | prompt, audio, y_<t)`` over answer tokens and eos.
The head owns no weights: the tokenizer, token embeddings, decoder and LM head are the backbone's
(``causal_lm``), so ASR, QA and captioning heads on one model share one LLM.

Generation: greedy, temperature sampling or beam search (``num_beams``) with the backbone's KV
cache: the prompt is run once, then one token per call (``use_cache=False`` re-runs the whole
sequence every token, for checks).
Per-item fields come from ``AudioBatch.prompts`` and the targets (see :mod:`audiomoe.heads.prompting`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from pydantic import Field

from audiomoe.backbones.hf_lm import SoftPrompt, assemble_soft_prompt
from audiomoe.core.decoding import positions_from_mask
from audiomoe.core.interfaces import Head, TaskLoss
from audiomoe.heads.beam import beam_search
from audiomoe.heads.functional import generation, sample_logits
from audiomoe.heads.prompting import (
    LLMTarget,
    PromptParams,
    check_decoder,
    inference,
    item_fields,
    prompt_parts,
    text_metrics,
    text_targets,
    token_ids,
)


@dataclass
class TextInputs:
    """Adapted audio ``features`` [B, N, D] with ``padding_mask``, per-item prompt fields, and the shared ``decoder``."""

    features: torch.Tensor
    padding_mask: torch.Tensor
    prompts: list[dict[str, Any]] = field(default_factory=list)
    decoder: Any = None


class TextHead(Head):
    """Prompted text answers from the shared causal-LM backbone; KV-cached generation."""

    accepts_prompts = True
    predicts_cheaply = False
    reads_decoder = True

    class Params(PromptParams):
        temperature: float = Field(0.0, ge=0.0, le=100.0, description="generation temperature (0: greedy)")
        num_beams: int = Field(
            1, ge=1, le=64, description="beam search width (1: greedy or sampled; >1: beam search, temperature unused)"
        )
        length_penalty: float = Field(
            1.0, ge=0.0, le=10.0, description="beam search: hypothesis score = sum log p / length ** length_penalty"
        )

    def __init__(self, params: Params, *, d_model: int) -> None:
        super().__init__(params)
        self.loss_weight = self.params.loss_weight

    def forward(
        self,
        features: torch.Tensor,
        padding_mask: torch.Tensor,
        prompts: Optional[list[Any]] = None,
        decoder: Any = None,
    ) -> TextInputs:
        """Keep the adapted audio, the prompt fields and the decoder for :meth:`loss` and :meth:`generate`."""
        check_decoder("text", decoder, text=True)
        return TextInputs(features, padding_mask, item_fields(prompts, features.shape[0]), decoder)

    def build_inputs(self, outputs: TextInputs, targets: Optional[list[LLMTarget]] = None) -> SoftPrompt:
        """The left-padded sequence of every item (answers as labels when ``targets`` is given)."""
        dec, tok = outputs.decoder, outputs.decoder.tokenizer
        pre, post, audio, answers = [], [], [], []
        for i in range(outputs.features.shape[0]):
            fields = dict(outputs.prompts[i]) if i < len(outputs.prompts) else {}
            if targets is not None:
                fields.update(targets[i].fields)
                answers.append(token_ids(tok, targets[i].answer) + [tok.eos_token_id])
            a, s = prompt_parts(tok, self.params, fields)
            pre.append(a)
            post.append(s)
            audio.append(outputs.features[i][~outputs.padding_mask[i]])
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return assemble_soft_prompt(dec.embed_tokens, pre, audio, post, answers if targets is not None else None, pad)

    def make_targets(self, raw: list[Any], device: torch.device) -> list[LLMTarget]:
        """Answer strings (or ``{"answer": ..., <template fields>}``)."""
        return text_targets(raw)

    def example_targets(self, n: int) -> list[Any]:
        """``n`` short answers, with a value for every field the default template asks for (e.g. ``question``)."""
        words = ["yes", "no", "a dog barks", "hello world"]
        names = {
            f for _, f, _, _ in string.Formatter().parse(self.params.templates[self.params.mode]) if f and f != "audio"
        }
        return [
            {"answer": words[i % len(words)], **{f: "what is it?" for f in names}} if names else words[i % len(words)]
            for i in range(n)
        ]

    def loss(self, outputs: TextInputs, targets: list[LLMTarget]) -> torch.Tensor:
        """Next-token cross-entropy over the answer tokens (+ the decoder's router losses)."""
        terms = self.loss_terms(outputs, targets)
        return terms.loss + sum(terms.aux_losses.values(), terms.loss.new_zeros(()))

    def loss_terms(self, outputs: TextInputs, targets: list[LLMTarget]) -> TaskLoss:
        """The answer cross-entropy, with the decoder's aux losses and routing beside it."""
        batch = self.build_inputs(outputs, targets)
        state = outputs.decoder.decode(batch.inputs_embeds, batch.attention_mask, batch.position_ids)
        logits = outputs.decoder.text_logits(state.hidden[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1), ignore_index=-100
        )
        return TaskLoss(
            loss,
            {f"decoder/{k}": v for k, v in state.aux_losses.items()},
            {f"decoder/{k}": v for k, v in state.routing.items()},
        )

    @generation
    def generate(
        self,
        outputs: TextInputs,
        *,
        use_cache: bool = True,
        max_new_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        num_beams: Optional[int] = None,
    ) -> list[str]:
        """An answer per item: the prompt once, then one token per decoder call (KV cache); stops at eos.

        ``num_beams`` > 1: beam search (:mod:`audiomoe.heads.beam`) instead of greedy / sampled decoding.
        """
        dec, tok = outputs.decoder, outputs.decoder.tokenizer
        limit = self.params.max_new_tokens if max_new_tokens is None else max_new_tokens
        temp = self.params.temperature if temperature is None else temperature
        beams = self.params.num_beams if num_beams is None else num_beams
        with inference(dec):
            batch = self.build_inputs(outputs)
            if beams > 1:
                ids = beam_search(
                    dec,
                    tok.eos_token_id,
                    batch.inputs_embeds,
                    batch.attention_mask,
                    batch.position_ids,
                    limit=limit,
                    beams=beams,
                    length_penalty=self.params.length_penalty,
                    use_cache=use_cache,
                )
                return [tok.decode(row, skip_special_tokens=True).strip() for row in ids]
            embeds, mask = batch.inputs_embeds, batch.attention_mask
            state = dec.decode(embeds, mask, batch.position_ids)
            last_pos = batch.position_ids[:, -1:]
            b = embeds.shape[0]
            done = torch.zeros(b, dtype=torch.bool, device=embeds.device)
            out: list[torch.Tensor] = []
            for _ in range(limit):
                nxt = sample_logits(dec.text_logits(state.hidden[:, -1]).float(), temp, 0, 1.0, generator)
                nxt = torch.where(done, torch.full_like(nxt, tok.eos_token_id), nxt)
                out.append(nxt)
                done |= nxt == tok.eos_token_id
                if bool(done.all()):
                    break
                new = dec.embed_tokens(nxt[:, None])
                mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
                last_pos = last_pos + 1
                if use_cache:
                    state = dec.decode(new, mask, last_pos, state.cache)
                else:  # the whole sequence again: what the cache must reproduce
                    embeds = torch.cat([embeds, new], 1)
                    state = dec.decode(embeds, mask, positions_from_mask(mask))
        ids = torch.stack(out, 1).tolist() if out else [[] for _ in range(b)]
        texts = []
        for row in ids:
            row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            texts.append(tok.decode(row, skip_special_tokens=True).strip())
        return texts

    def predict(self, outputs: TextInputs) -> list[str]:
        """Generated text per item."""
        return self.generate(outputs)

    def metrics(self, predictions: list[str], targets: list[LLMTarget]) -> Mapping[str, float]:
        """WER and CER (jiwer), corpus BLEU (sacrebleu) and exact-match accuracy, on normalised text."""
        return text_metrics(predictions, targets)
