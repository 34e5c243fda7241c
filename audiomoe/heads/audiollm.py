"""AudioLLM head (MoWE-Audio's setting): audio features become soft tokens inside a causal LM's prompt.

An adapter stacks ``downsample`` consecutive frames and maps them to the LM width
(``a_j = MLP([h_{kj}; ...; h_{kj+k-1}])``, the "modality adapter + projection" of MoWE-Audio);
the valid soft tokens replace the ``{audio}`` slot of a per-mode text template
(``"<s>Transcribe: {audio}\\n"``). The LM is any transformers causal LM (Llama / Qwen / Gemma
style), loaded from a local directory (``pretrained``) or built at random from ``config`` with a
file-free byte tokenizer. LoRA (peft) adapts the LM; ``save_adapters`` / ``load_adapters`` store
only the LoRA weights and the audio adapter. Training loss: next-token cross-entropy on the answer
tokens only, ``L = -sum_t log p(y_t | prompt, audio, y_<t)`` (mean over answer tokens).
Generation goes through ``generate(inputs_embeds=...)``. Templates, targets and metrics (WER, CER,
BLEU, exact match) are :mod:`audiomoe.heads.prompting`'s, shared with the ``text`` head. This head
holds its own LM: for a model whose tasks share one decoder, use the ``text`` head on a
``causal_lm`` backbone instead.

Per-item text, from :class:`audiomoe.model.AudioBatch`: ``prompts[i]`` (a mapping of template
fields, e.g. ``{"mode": "qa", "question": "..."}``, or a string used as ``question``) and
``targets[i]`` (the answer string, or a mapping ``{"answer": ..., <fields>}``). ``mode`` picks the
template (default ``params.mode``). Predictions: one generated string per item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from audiomoe.backbones.hf_lm import (
    LoRAParams,
    SoftPrompt,
    apply_lora,
    assemble_soft_prompt,
    check_one_source,
    lm_and_tokenizer,
)
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Head
from audiomoe.heads.functional import generation
from audiomoe.heads.prompting import (
    LLMTarget,
    PromptParams,
    item_fields,
    prompt_parts,
    text_metrics,
    text_targets,
    token_ids,
)

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


@dataclass
class AudioLLMOutput:
    """Adapted audio ``soft_tokens`` [B, M, H], ``lengths`` [B] valid ones, and per-item prompt fields."""

    soft_tokens: torch.Tensor
    lengths: torch.Tensor
    prompts: list[dict[str, Any]] = field(default_factory=list)


class AudioLLM(Head):
    """Causal-LM head with audio soft tokens, LoRA, and text generation."""

    accepts_prompts = True  # AudioModel passes AudioBatch.prompts to forward()
    predicts_cheaply = False  # predictions run generate(): AudioModel.forward(predict=False) skips them
    # peft starts LoRA's B at zero, so A's gradient (B^T dL/dy) is zero until B has moved one step
    gradient_exempt = ("*lora_A*",)

    class Params(PromptParams):
        pretrained: Optional[str] = Field(
            None, description="local directory holding the LM and its tokenizer (HF layout)"
        )
        config: Optional[dict[str, Any]] = Field(
            None,
            description="transformers config of a randomly initialised LM (needs model_type); default: a tiny Llama",
        )
        dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="LM weight dtype")
        lora: Optional[LoRAParams] = Field(default_factory=LoRAParams, description="LoRA on the LM; null = none")
        train_lm: bool = Field(False, description="without LoRA: fine-tune all LM weights (else the LM is frozen)")
        downsample: int = Field(1, ge=1, le=64, description="audio frames stacked into one soft token")
        adapter_hidden: int = Field(
            0, ge=0, le=65536, description="hidden width of the adapter MLP (0: one linear layer)"
        )
        num_beams: int = Field(1, ge=1, le=64, description="beam search width for generation (1: greedy)")

        @model_validator(mode="after")
        def _one_source(self) -> "AudioLLM.Params":
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
            self.adapter = nn.Sequential(
                nn.Linear(din, p.adapter_hidden), nn.GELU(), nn.Linear(p.adapter_hidden, width)
            )
        else:
            self.adapter = nn.Sequential(nn.Linear(din, width))
        self.adapter.to(self._lm_dtype)
        if self.tokenizer.eos_token_id is None:
            raise AudioMoEError("the LM's tokenizer has no eos token; answers need one to stop generation")
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )

    @property
    def _lm_dtype(self) -> torch.dtype:
        return getattr(torch, self.params.dtype)

    def _build_lm(self) -> tuple[nn.Module, Any]:
        p = self.params
        lm, tok = lm_and_tokenizer(p.pretrained, p.config, _TINY_LM, self._lm_dtype)
        if tok is None:
            raise AudioMoEError(
                f"'{p.pretrained}' holds no tokenizer files; the AudioLLM head needs the LM's tokenizer beside it"
            )
        if p.lora is not None:
            lm = apply_lora(lm, p.lora)
        elif not p.train_lm:
            lm.requires_grad_(False)
        return lm, tok

    # -- prompts --------------------------------------------------------------------------------

    def build_inputs(self, outputs: AudioLLMOutput, targets: Optional[list[LLMTarget]] = None) -> SoftPrompt:
        """The LM batch for ``outputs`` (with answers as labels when ``targets`` is given)."""
        b = outputs.soft_tokens.shape[0]
        pre, post, answers, audio = [], [], [], []
        for i in range(b):
            fields = dict(outputs.prompts[i]) if i < len(outputs.prompts) else {}
            if targets is not None:
                fields.update(targets[i].fields)
            a, s = prompt_parts(self.tokenizer, self.params, fields)
            pre.append(a)
            post.append(s)
            audio.append(outputs.soft_tokens[i, : int(outputs.lengths[i])])
            if targets is not None:
                answers.append(token_ids(self.tokenizer, targets[i].answer) + [self.tokenizer.eos_token_id])
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
        return AudioLLMOutput(soft, torch.div(valid + k - 1, k, rounding_mode="floor"), item_fields(prompts, b))

    def make_targets(self, raw: list[Any], device: torch.device) -> list[LLMTarget]:
        """Answer strings (or ``{"answer": ..., <template fields>}``); an empty answer is an error."""
        return text_targets(raw)

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
        return text_metrics(predictions, targets)

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

            saved = (
                json.loads((src / "adapter_config.json").read_text())
                if (src / "adapter_config.json").is_file()
                else None
            )
            if saved is None or saved.get("r") != self.params.lora.r:
                raise AudioMoEError(
                    f"'{src}' has no LoRA adapter of rank {self.params.lora.r} (found {saved and saved.get('r')})"
                )
            result = set_peft_model_state_dict(self.lm, load_peft_weights(str(src), device="cpu"))
            if getattr(result, "unexpected_keys", None):
                raise AudioMoEError(
                    f"LoRA weights in '{src}' do not fit this LM: unexpected {result.unexpected_keys[:5]}"
                )
        self.adapter.load_state_dict(load_file(str(src / "audio_adapter.safetensors")))
