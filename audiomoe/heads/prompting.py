"""Prompt templates, text targets and text metrics shared by the text-writing heads (not a component).

MoWE-Audio asks one LLM every task through a prompt: the adapted audio replaces the ``{audio}``
slot of a per-mode template (``"Transcribe the audio.\\n{audio}\\nTranscript:"``), the item's
fields fill the rest, and the answer follows. Written once here for the ``text`` head (a reader of
the shared backbone) and the ``audiollm`` head (its own LM). Metrics: WER, CER (jiwer), BLEU
(sacrebleu) and exact match, on normalised text.
"""

from __future__ import annotations

import string
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from pydantic import Field, field_validator, model_validator

from audiomoe.core.decoding import generation_mode
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.specs import Params
from audiomoe.heads.functional import normalize_text

TEMPLATES = {
    "asr": "Transcribe the audio.\n{audio}\nTranscript:",
    "qa": "Listen.\n{audio}\nQuestion: {question}\nAnswer:",
    "caption": "Describe the audio.\n{audio}\nCaption:",
}


class PromptParams(Params):
    """Templates, the default mode, the generation length and the loss weight of a text-writing head."""

    templates: dict[str, str] = Field(
        default_factory=lambda: dict(TEMPLATES), description="prompt template per mode; '{audio}' once"
    )
    mode: str = Field("asr", min_length=1, description="template used when an item names no mode")
    max_new_tokens: int = Field(32, ge=1, le=8192, description="generation length limit")
    loss_weight: float = Field(1.0, ge=0.0, le=1000.0, description="weight of this head's loss in the total loss")

    @field_validator("templates")
    @classmethod
    def _one_audio_slot(cls, templates: dict[str, str]) -> dict[str, str]:
        for mode, text in templates.items():
            names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
            if names.count("audio") != 1:
                raise ValueError(f"template '{mode}' must contain '{{audio}}' exactly once: {text!r}")
        return templates

    @model_validator(mode="after")
    def _known_mode(self) -> "PromptParams":
        if self.mode not in self.templates:
            raise ValueError(f"mode '{self.mode}' has no template; templates: {sorted(self.templates)}")
        return self


@dataclass
class LLMTarget:
    """One item's answer text and the template fields it carries (``mode``, ``question``, ...)."""

    answer: str
    fields: dict[str, Any] = field(default_factory=dict)


def item_fields(prompts: Optional[Sequence[Any]], b: int) -> list[dict[str, Any]]:
    """Per-item template fields from ``AudioBatch.prompts`` (a mapping, a string = ``question``, or None)."""
    items = []
    for i, pr in enumerate(prompts or [None] * b):
        if pr is None:
            items.append({})
        elif isinstance(pr, str):
            items.append({"question": pr})
        elif isinstance(pr, Mapping):
            items.append(dict(pr))
        else:
            raise AudioMoEError(
                f"prompt of item {i} must be a mapping of template fields or a string, got {type(pr).__name__}"
            )
    return items


def text_targets(raw: list[Any]) -> list[LLMTarget]:
    """Answer strings (or ``{"answer": ..., <template fields>}``); an empty answer is an error."""
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            answer, fields = item, {}
        elif isinstance(item, Mapping) and "answer" in item:
            fields = {k: v for k, v in item.items() if k != "answer"}
            answer = item["answer"]
        else:
            raise AudioMoEError(f"text target of item {i} must be a string or a mapping with 'answer', got {item!r}")
        if not isinstance(answer, str) or not answer.strip():
            raise AudioMoEError(f"text target of item {i} has an empty answer/transcript {answer!r}")
        out.append(LLMTarget(answer, fields))
    return out


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of ``text`` without special tokens (none for an empty string)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def prompt_parts(tokenizer: Any, params: PromptParams, fields: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """``([bos] + ids before {audio}, ids after {audio})`` of the item's template filled with ``fields``."""
    fields = dict(fields)
    mode = fields.pop("mode", params.mode)
    if mode not in params.templates:
        raise AudioMoEError(f"prompt mode '{mode}' has no template; templates: {sorted(params.templates)}")
    before, after = params.templates[mode].split("{audio}")
    try:
        pre, post = before.format(**fields), after.format(**fields)
    except KeyError as exc:
        raise AudioMoEError(
            f"template '{mode}' needs the field {exc} (give it in the item's prompt or target)"
        ) from None
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + token_ids(tokenizer, pre), token_ids(tokenizer, post)


def text_metrics(predictions: Sequence[str], targets: Sequence[LLMTarget]) -> dict[str, float]:
    """WER and CER (jiwer), corpus BLEU (sacrebleu) and exact-match accuracy, on normalised text."""
    import jiwer
    import sacrebleu

    refs = [normalize_text(t.answer) for t in targets]
    hyps = [normalize_text(h) for h in predictions]
    keep = [i for i, r in enumerate(refs) if r]
    r, h = [refs[i] for i in keep], [hyps[i] for i in keep]
    out = {"exact_match": sum(a == b for a, b in zip(refs, hyps)) / max(len(refs), 1)}
    if r:
        out["wer"] = float(jiwer.wer(r, h))
        out["cer"] = float(jiwer.cer(r, h))
    out["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [[t.answer for t in targets]]).score)
    return out


@contextmanager
def inference(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no gradients and :func:`~audiomoe.core.decoding.generation_mode` on ``module`` (the shared decoder) while generating."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), generation_mode():
            yield
    finally:
        module.train(was)


def check_decoder(head: str, decoder: Any, text: bool = False) -> Any:
    """The shared backbone a decoder-reading head was given, or a clear error saying what the spec lacks."""
    if decoder is None or not getattr(decoder, "supports_decoding", False):
        got = "no backbone" if decoder is None else f"backbone {type(decoder).__name__}, which cannot decode"
        raise AudioMoEError(
            f"the {head} head reads the model's shared decoder but the model has {got}; add one to the spec "
            "(backbone: causal_lm, moe_transformer or unimoe_transformer)"
        )
    if text and getattr(decoder, "tokenizer", None) is None:
        raise AudioMoEError(
            f"the {head} head writes text but backbone {type(decoder).__name__} has no tokenizer; use a causal_lm backbone "
            "(a random one has a byte tokenizer; a local one needs its tokenizer files)"
        )
    return decoder
