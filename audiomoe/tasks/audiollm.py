"""AudioLLM head (MoWE-Audio's setting): audio features become soft tokens inside a causal LM's prompt.

An adapter stacks ``downsample`` consecutive frames and maps them to the LM width
(``a_j = MLP([h_{kj}; ...; h_{kj+k-1}])``, the "modality adapter + projection" of MoWE-Audio);
the valid soft tokens replace the ``{audio}`` slot of a per-mode text template
(``"<s>Transcribe: {audio}\\n"``). The LM is any transformers causal LM (Llama / Qwen / Gemma
style), loaded from a local directory (``pretrained``) or built at random from ``config`` with a
file-free byte tokenizer. LoRA (peft) adapts the LM; ``save_adapters`` / ``load_adapters`` store
only the LoRA weights and the audio adapter. Training loss: next-token cross-entropy on the answer
tokens only, ``L = -sum_t log p(y_t | prompt, audio, y_<t)`` (mean over answer tokens).
Generation goes through ``generate(inputs_embeds=...)``. Metrics: WER, CER (jiwer), BLEU
(sacrebleu) and exact-match accuracy (after text normalisation) for closed questions.

Per-item text, from :class:`audiomoe.model.AudioBatch`: ``prompts[i]`` (a mapping of template
fields, e.g. ``{"mode": "qa", "question": "..."}``, or a string used as ``question``) and
``targets[i]`` (the answer string, or a mapping ``{"answer": ..., <fields>}``). ``mode`` picks the
template (default ``params.mode``). Predictions: one generated string per item.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Task
from audiomoe.core.specs import Params
from audiomoe.tasks.functional import generation, normalize_text
from audiomoe.tasks.llm_utils import LoRAParams, SoftPrompt, apply_lora, assemble_soft_prompt, byte_tokenizer, check_one_source, load_lm

_TINY_LM = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    # A random LM with the usual 0.02 init has near-uniform outputs that a low-rank update barely moves.
    "initializer_range": 0.2,
}
_TEMPLATES = {
    "asr": "Transcribe the audio.\n{audio}\nTranscript:",
    "qa": "Listen.\n{audio}\nQuestion: {question}\nAnswer:",
    "caption": "Describe the audio.\n{audio}\nCaption:",
}


@dataclass
class AudioLLMOutput:
    """Adapted audio ``soft_tokens`` [B, M, H], ``lengths`` [B] valid ones, and per-item prompt fields."""

    soft_tokens: torch.Tensor
    lengths: torch.Tensor
    prompts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class LLMTarget:
    """One item's answer text and the template fields it carries (``mode``, ``question``, ...)."""

    answer: str
    fields: dict[str, Any] = field(default_factory=dict)


class AudioLLM(Task):
    """Causal-LM head with audio soft tokens, LoRA, and text generation."""

    accepts_prompts = True  # AudioModel passes AudioBatch.prompts to forward()
    predicts_cheaply = False  # predictions run generate(): AudioModel.forward(predict=False) skips them
    # peft starts LoRA's B at zero, so A's gradient (B^T dL/dy) is zero until B has moved one step
    gradient_exempt = ("*lora_A*",)

    class Params(Params):
        pretrained: Optional[str] = Field(None, description="local directory holding the LM and its tokenizer (HF layout)")
        config: Optional[dict[str, Any]] = Field(
            None, description="transformers config of a randomly initialised LM (needs model_type); default: a tiny Llama"
        )
        dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="LM weight dtype")
        lora: Optional[LoRAParams] = Field(default_factory=LoRAParams, description="LoRA on the LM; null = none")
        train_lm: bool = Field(False, description="without LoRA: fine-tune all LM weights (else the LM is frozen)")
        downsample: int = Field(1, ge=1, le=64, description="audio frames stacked into one soft token")
        adapter_hidden: int = Field(0, ge=0, le=65536, description="hidden width of the adapter MLP (0: one linear layer)")
        templates: dict[str, str] = Field(default_factory=lambda: dict(_TEMPLATES), description="prompt template per mode; '{audio}' once")
        mode: str = Field("asr", min_length=1, description="template used when an item names no mode")
        max_new_tokens: int = Field(32, ge=1, le=8192, description="generation length limit")
        num_beams: int = Field(1, ge=1, le=64, description="beam search width for generation (1: greedy)")
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
        def _known_mode(self) -> "AudioLLM.Params":
            if self.mode not in self.templates:
                raise ValueError(f"mode '{self.mode}' has no template; templates: {sorted(self.templates)}")
            check_one_source(self.pretrained, self.config)
            return self

    def __init__(self, params: Params, *, d_model: int) -> None:
        super().__init__(params)
        p = self.params
        self.loss_weight = p.loss_weight
        self.lm, self.tokenizer = self._build_lm()
        cfg = self.lm.config
        width = cfg.get_text_config().hidden_size
        self.context = getattr(cfg.get_text_config(), "max_position_embeddings", None)
        din = d_model * p.downsample
        if p.adapter_hidden:
            self.adapter = nn.Sequential(nn.Linear(din, p.adapter_hidden), nn.GELU(), nn.Linear(p.adapter_hidden, width))
        else:
            self.adapter = nn.Sequential(nn.Linear(din, width))
        self.adapter.to(self._lm_dtype)
        if self.tokenizer.eos_token_id is None:
            raise AudioMoEError("the LM's tokenizer has no eos token; answers need one to stop generation")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self._split = {m: t.split("{audio}") for m, t in p.templates.items()}

    @property
    def _lm_dtype(self) -> torch.dtype:
        return getattr(torch, self.params.dtype)

    def _build_lm(self) -> tuple[nn.Module, Any]:
        from transformers import AutoTokenizer

        p = self.params
        if p.pretrained is not None:
            lm = load_lm(p.pretrained, {}, self._lm_dtype)  # names a missing directory first
            tok = AutoTokenizer.from_pretrained(Path(p.pretrained).expanduser(), local_files_only=True)
        else:
            tok = byte_tokenizer()
            ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
            lm = load_lm(None, p.config or _TINY_LM, self._lm_dtype, **ids)
        if p.lora is not None:
            lm = apply_lora(lm, p.lora)
        elif not p.train_lm:
            lm.requires_grad_(False)
        return lm, tok

    # -- prompts --------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _prompt_parts(self, fields: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        fields = dict(fields)
        mode = fields.pop("mode", self.params.mode)
        if mode not in self._split:
            raise AudioMoEError(f"prompt mode '{mode}' has no template; templates: {sorted(self._split)}")
        before, after = self._split[mode]
        try:
            pre, post = before.format(**fields), after.format(**fields)
        except KeyError as exc:
            raise AudioMoEError(f"template '{mode}' needs the field {exc} (give it in the item's prompt or target)") from None
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return bos + self._ids(pre), self._ids(post)

    def build_inputs(self, outputs: AudioLLMOutput, targets: Optional[list[LLMTarget]] = None) -> SoftPrompt:
        """The LM batch for ``outputs`` (with answers as labels when ``targets`` is given)."""
        b = outputs.soft_tokens.shape[0]
        pre, post, answers, audio = [], [], [], []
        for i in range(b):
            fields = dict(outputs.prompts[i]) if i < len(outputs.prompts) else {}
            if targets is not None:
                fields.update(targets[i].fields)
            a, s = self._prompt_parts(fields)
            pre.append(a)
            post.append(s)
            audio.append(outputs.soft_tokens[i, : int(outputs.lengths[i])])
            if targets is not None:
                answers.append(self._ids(targets[i].answer) + [self.tokenizer.eos_token_id])
            extra = len(answers[i]) if targets is not None else self.params.max_new_tokens
            total = len(a) + audio[i].shape[0] + len(s) + extra
            if self.context is not None and total > self.context:
                what = f"answer {extra}" if targets is not None else f"max_new_tokens {extra}"
                raise AudioMoEError(
                    f"item {i}: prompt {len(a) + len(s)} tokens + audio {audio[i].shape[0]} soft tokens + {what} = {total} "
                    f"exceeds the LM's context of {self.context} positions; shorten the prompt or audio, raise downsample, "
                    "or use an LM with a longer context"
                )
        embed = self.lm.get_input_embeddings()
        return assemble_soft_prompt(embed, pre, audio, post, answers if targets is not None else None, self.pad_id)

    # -- Task -----------------------------------------------------------------------------------

    def forward(
        self, features: torch.Tensor, padding_mask: torch.Tensor, prompts: Optional[list[Any]] = None
    ) -> AudioLLMOutput:
        """Adapt features to soft tokens (stacking ``downsample`` frames); keep the prompt fields."""
        k = self.params.downsample
        b, n, d = features.shape
        valid = (~padding_mask).sum(1)
        features = features.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        if n % k:
            features = nn.functional.pad(features, (0, 0, 0, k - n % k))
        stacked = features.reshape(b, -1, k * d)
        soft = self.adapter(stacked.to(self._lm_dtype))
        items = []
        for i, pr in enumerate(prompts or [None] * b):
            if pr is None:
                items.append({})
            elif isinstance(pr, str):
                items.append({"question": pr})
            elif isinstance(pr, Mapping):
                items.append(dict(pr))
            else:
                raise AudioMoEError(f"prompt of item {i} must be a mapping of template fields or a string, got {type(pr).__name__}")
        return AudioLLMOutput(soft, torch.div(valid + k - 1, k, rounding_mode="floor"), items)

    def make_targets(self, raw: list[Any], device: torch.device) -> list[LLMTarget]:
        """Answer strings (or ``{"answer": ..., <template fields>}``); an empty answer is an error."""
        out = []
        for i, item in enumerate(raw):
            if isinstance(item, str):
                answer, fields = item, {}
            elif isinstance(item, Mapping) and "answer" in item:
                fields = {k: v for k, v in item.items() if k != "answer"}
                answer = item["answer"]
            else:
                raise AudioMoEError(f"AudioLLM target of item {i} must be a string or a mapping with 'answer', got {item!r}")
            if not isinstance(answer, str) or not answer.strip():
                raise AudioMoEError(f"AudioLLM target of item {i} has an empty answer/transcript {answer!r}")
            out.append(LLMTarget(answer, fields))
        return out

    def example_targets(self, n: int) -> list[str]:
        """``n`` short answers."""
        words = ["yes", "no", "a dog barks", "hello world"]
        return [words[i % len(words)] for i in range(n)]

    def loss(self, outputs: AudioLLMOutput, targets: list[LLMTarget]) -> torch.Tensor:
        """Next-token cross-entropy over the answer tokens (and eos)."""
        batch = self.build_inputs(outputs, targets)
        out = self.lm(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            labels=batch.labels,
        )
        return out.loss.float()

    @generation
    def generate(self, outputs: AudioLLMOutput, **kwargs: Any) -> list[str]:
        """Generate an answer per item through ``lm.generate(inputs_embeds=...)``; kwargs go to generate."""
        batch = self.build_inputs(outputs)
        opts = dict(
            max_new_tokens=self.params.max_new_tokens,
            num_beams=self.params.num_beams,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        opts.update(kwargs)
        ids = self.lm.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, **opts)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def predict(self, outputs: AudioLLMOutput) -> list[str]:
        """Generated text per item."""
        return self.generate(outputs)

    def metrics(self, predictions: list[str], targets: list[LLMTarget]) -> Mapping[str, float]:
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

    # -- adapters -------------------------------------------------------------------------------

    def save_adapters(self, path: str | Path) -> Path:
        """Write only the trained parts: LoRA weights (peft layout) and the audio adapter (safetensors)."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.params.lora is not None:
            self.lm.save_pretrained(str(out))
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter.state_dict().items()}
        save_file(state, str(out / "audio_adapter.safetensors"))
        (out / "audiollm.json").write_text(json.dumps(self.params.model_dump(mode="json"), indent=1), encoding="utf-8")
        return out

    def load_adapters(self, path: str | Path) -> None:
        """Load what :meth:`save_adapters` wrote into this head (same LM architecture and LoRA rank)."""
        from safetensors.torch import load_file

        src = Path(path)
        if not (src / "audio_adapter.safetensors").is_file():
            raise AudioMoEError(f"'{src}' holds no audio_adapter.safetensors; was it written by save_adapters()?")
        if self.params.lora is not None:
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            saved = json.loads((src / "adapter_config.json").read_text()) if (src / "adapter_config.json").is_file() else None
            if saved is None or saved.get("r") != self.params.lora.r:
                raise AudioMoEError(f"'{src}' has no LoRA adapter of rank {self.params.lora.r} (found {saved and saved.get('r')})")
            result = set_peft_model_state_dict(self.lm, load_peft_weights(str(src), device="cpu"))
            if getattr(result, "unexpected_keys", None):
                raise AudioMoEError(f"LoRA weights in '{src}' do not fit this LM: unexpected {result.unexpected_keys[:5]}")
        self.adapter.load_state_dict(load_file(str(src / "audio_adapter.safetensors")))
