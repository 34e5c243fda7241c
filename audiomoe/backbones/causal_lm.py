"""A transformers causal LM as the shared backbone: adapted audio frames in as soft tokens, hidden states out.

The decoder both seed designs share across tasks (MoWE-Audio: one LLM behind the adapter;
UniMoE-Audio: Qwen2.5 upcycled into a top-p MoE). The LM comes from a local directory (Hugging Face
layout, ``pretrained``) or a random ``config`` (a tiny Llama by default, its width = ``d_model``);
a pretrained LM of another width gets linear maps in and out. Options: LoRA through peft (the LM
is then frozen), and a ``moe`` block that upcycles its dense MLPs into audiomoe MoE layers with any
router and expert layout (``audiomoe.backbones.upcycle``; every routed layer's record and aux losses
are reported as ``layer<i>``). Attention is causal, with the padding mask as the attention mask.

Decoding (``supports_decoding``): :meth:`CausalLMBackbone.decode` runs an interleaved sequence
``[prompt tokens | audio soft tokens | codec embeddings]`` through the LM's decoder with its own
KV cache (transformers' ``DynamicCache`` for the prefix, then, for Llama / Qwen2, preallocated buffers and
a lean step: :mod:`audiomoe.backbones.lm_step`); the text head reads the LM's tokenizer, token
embeddings and LM head through :meth:`embed_tokens` / :meth:`text_logits`. Those two tables stay
frozen (as in MoWE-Audio and SALMONN: the LLM's vocabulary is not retrained); decoding and
reading text need the LM's width to be ``d_model``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from audiomoe.backbones.hf_lm import LoRAParams, apply_lora, check_one_source, lm_and_tokenizer
from audiomoe.backbones.lm_step import StepCache, lean_step, lean_step_supported
from audiomoe.backbones.upcycle import UpcycledMLP, upcycle_causal_lm
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Backbone, BackboneOutput, DecoderState
from audiomoe.core.specs import ComponentSpec, Params, Slot

TINY_LM = {
    "model_type": "llama",
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


class CausalLMBackbone(Backbone):
    """transformers causal LM (local or random), optional LoRA and MoE upcycling; [B, N, d_model] -> [B, N, d_model]."""

    # peft starts LoRA's B at zero, so A's gradient is zero until B has moved one step
    gradient_exempt = ("*lora_A*",)
    supports_decoding = True

    class Params(Params):
        pretrained: Optional[str] = Field(
            None, max_length=4096, description="local directory of the LM (HF layout); None: a random config"
        )
        config: Optional[dict[str, Any]] = Field(
            None,
            description="transformers config of a random LM (model_type needed); default: a tiny Llama of width d_model",
        )
        tokenizer: Optional[str] = Field(
            None,
            max_length=4096,
            description="with 'config': a local tokenizer directory instead of the byte tokenizer (an imported release)",
        )
        lora: Optional[LoRAParams] = Field(
            None, description="LoRA adapters (the LM is then frozen); null = train the LM itself"
        )
        moe: Annotated[Optional[ComponentSpec], Slot("moe")] = Field(
            None,
            description="upcycle the dense MLPs into MoE layers: the moe component (num_experts, router, shared, null, ...)",
        )
        moe_init: Literal["copy", "slice"] = Field(
            "copy", description="experts copy the dense MLP, or take consecutive slices of it"
        )

        @model_validator(mode="after")
        def _one_source(self) -> "CausalLMBackbone.Params":
            check_one_source(self.pretrained, self.config)
            return self

    def __init__(self, params: Params, *, d_model: int) -> None:
        super().__init__(params)
        p = self.params
        self.lm, self.tokenizer = lm_and_tokenizer(
            p.pretrained, p.config, {**TINY_LM, "hidden_size": d_model}, tokenizer=p.tokenizer
        )
        if p.moe is not None:
            upcycle_causal_lm(self.lm, p.moe.model_dump(), init=p.moe_init)
        if p.lora is not None:
            self.lm = apply_lora(self.lm, p.lora)
        # the backbone feeds inputs_embeds and reads hidden states: the token embedding and LM head are
        # not on its path (a text head reads them), so they are frozen rather than left never learning
        for emb in (self.lm.get_input_embeddings(), self.lm.get_output_embeddings()):
            if emb is not None:
                emb.requires_grad_(False)
        # found once: a decoding step is a few hundred microseconds, a module walk is not free
        self._upcycled = [m for m in self.lm.modules() if isinstance(m, UpcycledMLP)]
        # decided once: later cached calls skip transformers' per-call machinery (LoRA wraps the LM: not this path)
        self._lean = p.lora is None and lean_step_supported(self.lm.get_decoder())
        width = self.width = self.lm.config.get_text_config().hidden_size
        self.d_model = d_model
        self.into = nn.Identity() if width == d_model else nn.Linear(d_model, width)
        self.out = nn.Identity() if width == d_model else nn.Linear(width, d_model)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> BackboneOutput:
        """Run the LM's decoder on ``x`` [B, N, D] as ``inputs_embeds`` (causal; padding masked out of attention)."""
        decoder = self.lm.get_decoder()
        mask = (~padding_mask).long()
        upcycled = self._upcycled
        padded = None if torch.is_grad_enabled() else bool(padding_mask.any())  # read once, not once per layer
        for m in upcycled:  # the decoder is called directly, past upcycling's hook on the LM: hand the mask over here
            m.attention_mask, m.padded = mask, padded
        try:
            h = decoder(inputs_embeds=self.into(x), attention_mask=mask).last_hidden_state
        finally:
            for m in upcycled:
                m.attention_mask, m.padded = None, None
        return self._routed(upcycled, BackboneOutput(self.out(h).masked_fill(padding_mask[..., None], 0.0)))

    def _routed(self, upcycled: list[UpcycledMLP], out: Any) -> Any:
        for i, mlp in enumerate(upcycled):
            if mlp.routing is not None:
                out.routing[f"layer{i}"] = mlp.routing
                out.aux_losses.update({f"layer{i}/{k}": v for k, v in mlp.routing.aux_losses.items()})
        return out

    def decode(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any = None
    ) -> DecoderState:
        """Causal pass of new positions through the LM's decoder with a KV cache (see :mod:`audiomoe.core.decoding`).

        The first call (``cache`` None) runs transformers' decoder; for a Llama / Qwen2 LM without autograd its
        cache then moves into preallocated buffers and later calls take :func:`~audiomoe.backbones.lm_step.lean_step`
        (the same ops, none of the per-call machinery; new positions of such a call are real tokens).
        """
        upcycled = self._upcycled
        if isinstance(cache, StepCache):
            # new positions are real: the MoE layers run unmasked (their attention_mask is None between calls)
            h = lean_step(self.lm.get_decoder(), self.into(embeds), position_ids, cache)
            return self._routed(upcycled, DecoderState(self.out(h), cache))
        from transformers import DynamicCache

        start = cache is None
        cache = DynamicCache() if cache is None else cache
        mask = attention_mask.long()
        # nothing padded: no mask is the same attention (an all-ones mask means no padding to transformers),
        # and skips its ~150 us of mask checks per decoding step
        mask = None if bool(mask.all()) else mask
        for m in upcycled:  # the new positions are the mask's last columns (UpcycledMLP takes them)
            m.attention_mask = mask
        try:
            out = self.lm.get_decoder()(
                inputs_embeds=self.into(embeds),
                attention_mask=mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
        finally:
            for m in upcycled:
                m.attention_mask = None
        cache = out.cache
        if start and self._lean and not torch.is_grad_enabled():
            cache = StepCache.from_dynamic(cache, mask, self.lm.get_decoder(), out.last_hidden_state.dtype)
        return self._routed(upcycled, DecoderState(self.out(out.last_hidden_state), cache))

    def select_cache(self, cache: Any, rows: torch.Tensor) -> Any:
        """The cache of batch rows ``rows``: a new :class:`StepCache`, or transformers' ``DynamicCache`` reordered in place."""
        if isinstance(cache, StepCache):
            return cache.select(rows)
        cache.reorder_cache(rows)
        return cache

    def _check_text_width(self) -> None:
        if self.width != self.d_model:
            raise AudioMoEError(
                f"the LM's width is {self.width} but d_model is {self.d_model}: a text head reads the LM's own embeddings "
                f"and LM head, so set d_model: {self.width} in the spec"
            )

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The LM's (frozen) token embeddings of ``ids``."""
        self._check_text_width()
        return self.lm.get_input_embeddings()(ids)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's next-token logits of ``hidden`` [.., D]."""
        self._check_text_width()
        return self.lm.get_output_embeddings()(hidden)

    def num_active_parameters(self) -> Optional[float]:
        """All parameters, with each upcycled MoE layer counted by its measured active share."""
        moe = [m.moe for m in self.lm.modules() if isinstance(m, UpcycledMLP)]
        if not moe:
            return None
        total = sum(q.numel() for q in self.parameters())
        return total - sum(q.numel() for m in moe for q in m.parameters()) + sum(m.num_active_parameters() for m in moe)
