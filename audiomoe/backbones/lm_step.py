"""A lean KV-cached decoding step for Llama / Qwen2 transformers LMs: the same ops, without the per-call machinery.

:meth:`CausalLMBackbone.decode <audiomoe.backbones.causal_lm.CausalLMBackbone.decode>` runs the first call
(the prefix) through transformers' own decoder; each later call of a few new positions runs here. A step
computes exactly what transformers' decoder layer computes (Llama / Qwen2, ``sdpa`` attention, default
RoPE: ``h += o_proj(sdpa(rope(q), rope(k), v))``, ``h += mlp(norm(h))``, the layers' own modules for the
projections' weights, norms and MLPs, ``apply_rotary_pos_emb``'s terms and ``sdpa_attention_forward``),
so the hidden states are equal to the last bit; what it leaves out is what a decoding step of a tiny LM
spends most of its time on: the ``DynamicCache``'s ``torch.cat`` of the whole past per layer and step,
re-building the 4-D mask and the RoPE table from the position ids, and the decorators, keyword plumbing
and output recording around every module call.

The cache (:class:`StepCache`) holds every layer's keys and values [B, H_kv, capacity, Dh] in buffers
written in place (the room doubles when full), the RoPE cos / sin of every position up to the capacity
(RoPE is elementwise in the position, so a table row equals what the rotary module computes), and the
prefix's padding as a boolean key mask (None when no row is padded: transformers then passes no mask).
New positions of a cached call are real tokens (every head appends real positions), so a step reads
nothing on the host.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

#: model types whose decoder layer is exactly ``norm -> attention -> residual -> norm -> mlp -> residual``
#: with RoPE as ``apply_rotary_pos_emb`` (checked equal to transformers' path in tests/backbones)
LEAN_MODEL_TYPES = ("llama", "qwen2")


def lean_step_supported(decoder: nn.Module) -> bool:
    """Whether :func:`lean_step` computes ``decoder`` (the LM's ``get_decoder()``) exactly: Llama / Qwen2, sdpa,
    default RoPE, no sliding window."""
    config = getattr(decoder, "config", None)
    if config is None or getattr(config, "model_type", None) not in LEAN_MODEL_TYPES:
        return False
    rope = getattr(config, "rope_parameters", None) or {}
    if config._attn_implementation != "sdpa" or rope.get("rope_type", "default") != "default":
        return False
    rotary = getattr(decoder, "rotary_emb", None)
    layers = getattr(decoder, "layers", None)
    if rotary is None or layers is None or not hasattr(decoder, "norm"):
        return False
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "sliding_window", None) is not None:
            return False
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        # plain Linear layers: a step calls F.linear on their weights (what Linear.forward does); LoRA etc. are not
        if not hasattr(attn, "head_dim") or any(type(m) is not nn.Linear or not _plain(m) for m in projections):
            return False
        if not all(_rms_norm_of(getattr(layer, n, None)) for n in ("input_layernorm", "post_attention_layernorm")):
            return False
    return _rms_norm_of(decoder.norm)


def _plain(module: nn.Module) -> bool:
    """No hooks on the module: calling its math directly skips nothing."""
    return not (module._forward_hooks or module._forward_pre_hooks)


def _rms_norm_of(norm: Optional[nn.Module]) -> bool:
    """Whether ``norm`` is transformers' Llama / Qwen2 RMSNorm, unhooked (its math is then :func:`_rms_norm`'s)."""
    return (
        type(norm).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm") and _plain(norm) and hasattr(norm, "variance_epsilon")
    )


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm / Qwen2RMSNorm forward, op for op (the casts only where they cast)."""
    dtype = h.dtype
    x = h if dtype == torch.float32 else h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x if dtype == torch.float32 else x.to(dtype))


class StepCache:
    """Keys / values of every layer in preallocated buffers, the RoPE table and the prefix's key mask."""

    __slots__ = ("k", "v", "n", "keep", "cos", "sin", "half", "plan")

    def __init__(self, k: list, v: list, n: int, keep: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor):
        self.k, self.v, self.n, self.keep, self.cos, self.sin = k, v, n, keep, cos, sin
        self.plan: Optional[tuple] = None  # the decoder's weights, read once per generation (see lean_step)
        d = cos.shape[-1]
        # rotate_half(x) = cat(-x2, x1) is x[..., half] * sign: the sign lives in ``sin`` (see _rope_table)
        self.half = torch.cat([torch.arange(d // 2, d), torch.arange(d // 2)]).to(cos.device)

    @classmethod
    def from_dynamic(
        cls, cache: Any, mask: Optional[torch.Tensor], decoder: nn.Module, dtype: torch.dtype
    ) -> "StepCache":
        """The prefix's transformers ``DynamicCache`` copied into buffers with room for as many positions again (>= 256).

        ``mask`` [B, n]: the prefix's attention mask (None: no row padded).
        """
        keys = [layer.keys for layer in cache.layers]
        n = keys[0].shape[2]
        cap = n + max(n, 256)
        k, v = [], []
        for layer in cache.layers:
            for src, out in ((layer.keys, k), (layer.values, v)):
                buf = src.new_empty(*src.shape[:2], cap, src.shape[3])
                buf[:, :, :n] = src
                out.append(buf)
        keep = None
        if mask is not None:  # positions written later are real: True from the start
            keep = torch.ones(mask.shape[0], 1, 1, cap, dtype=torch.bool, device=mask.device)
            keep[:, 0, 0, :n] = mask.bool()
        cos, sin = _rope_table(decoder.rotary_emb, cap, keys[0].device, dtype)
        return cls(k, v, n, keep, cos, sin)

    def _grow(self, need: int, decoder: nn.Module) -> None:
        cap = max(2 * self.k[0].shape[2], need)
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                new = old.new_empty(*old.shape[:2], cap, old.shape[3])
                new[:, :, : self.n] = old[:, :, : self.n]
                bufs[i] = new
        if self.keep is not None:
            keep = self.keep.new_ones(*self.keep.shape[:3], cap)
            keep[..., : self.n] = self.keep[..., : self.n]
            self.keep = keep
        self.cos, self.sin = _rope_table(decoder.rotary_emb, cap, self.cos.device, self.cos.dtype)

    def select(self, rows: torch.Tensor) -> "StepCache":
        """A new cache of batch rows ``rows`` (repeats allowed; beam search), with the same room."""
        pick = lambda t: t.index_select(0, rows)  # noqa: E731 - one rule for every buffer
        keep = None if self.keep is None else pick(self.keep)
        out = StepCache([pick(t) for t in self.k], [pick(t) for t in self.v], self.n, keep, self.cos, self.sin)
        out.plan = self.plan
        return out

    def get_seq_length(self) -> int:
        """Positions held (transformers' cache method of the same name)."""
        return self.n


def _rope_table(rotary: nn.Module, length: int, device: torch.device, dtype: torch.dtype):
    """cos, signed sin [length, Dh] of positions 0..length-1, computed by the rotary module itself.

    RoPE is elementwise in the position, so a row equals the module's output at that position. The first
    half of ``sin`` is negated: ``rotate_half(x) * sin == x[..., half] * signed_sin`` exactly (a sign flip
    is exact in floating point), two ops fewer per tensor than the slices, negation and concatenation.
    """
    pos = torch.arange(length, device=device)[None]
    cos, sin = rotary(torch.empty(0, device=device, dtype=dtype), pos)
    sin = sin[0].clone()
    sin[:, : sin.shape[1] // 2].neg_()
    return cos[0], sin


def lean_step(decoder: nn.Module, x: torch.Tensor, position_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
    """Hidden states [B, L, D] of new positions ``x`` [B, L, D] at ``position_ids`` [B, L]; writes their keys and values.

    ``decoder`` (the LM's ``get_decoder()``) must pass :func:`lean_step_supported`; the MLPs are called as they
    are (an upcycled MoE layer takes its mask from ``UpcycledMLP.attention_mask``, which the caller sets).
    """
    b, length = x.shape[:2]
    n0, n1 = cache.n, cache.n + length
    if n1 > cache.k[0].shape[2]:
        cache._grow(n1, decoder)
    # a step's one query row sees every key so far: the padding of the prefix is the whole mask (as transformers')
    mask = None if cache.keep is None else cache.keep[..., :n1]
    if length > 1 and mask is None:
        causal = torch.ones(length, n1, dtype=torch.bool, device=x.device).tril(n0)
        mask = causal[None, None]
    elif length > 1:
        mask = mask & torch.ones(length, n1, dtype=torch.bool, device=x.device).tril(n0)
    # [B, 1, L, Dh]: one lookup per step for every layer (transformers' apply_rotary_pos_emb unsqueezes per layer)
    cos, sin = cache.cos[position_ids].unsqueeze(1), cache.sin[position_ids].unsqueeze(1)
    linear, half = nn.functional.linear, cache.half
    if cache.plan is None:  # module attribute lookups are ~100 per step otherwise: read once per generation
        cache.plan = _plan(decoder)
    layers, final = cache.plan
    h = x
    for i, (n1w, n1e, wq, bq, wk, bk, wv, bv, wo, bo, n2w, n2e, mlp, attn, hd) in enumerate(layers):
        residual = h
        a = _rms_norm(h, n1w, n1e)
        q, k, v = linear(a, wq, bq), linear(a, wk, bk), linear(a, wv, bv)
        if length == 1:  # [B, 1, H*Dh] -> [B, H, 1, Dh] is a view: no transpose
            q, k, v = q.view(b, -1, 1, hd), k.view(b, -1, 1, hd), v.view(b, -1, 1, hd)
        else:
            q, k, v = (t.view(b, length, -1, hd).transpose(1, 2) for t in (q, k, v))
        # transformers' q * cos + rotate_half(q) * sin, term for term
        q = q * cos + q.index_select(-1, half) * sin
        k = k * cos + k.index_select(-1, half) * sin
        cache.k[i].narrow(2, n0, length).copy_(k)
        cache.v[i].narrow(2, n0, length).copy_(v)
        out, _ = _sdpa(attn, q, cache.k[i].narrow(2, 0, n1), cache.v[i].narrow(2, 0, n1), mask)
        h = residual + linear(out.reshape(b, length, -1), wo, bo)
        h = h + mlp(_rms_norm(h, n2w, n2e))
    cache.n = n1
    return _rms_norm(h, *final)


def _plan(decoder: nn.Module) -> tuple:
    """Per layer: norm weights and eps, q / k / v / o weights and biases, the MLP, the attention, the head size."""
    layers = []
    for layer in decoder.layers:
        attn, n1, n2 = layer.self_attn, layer.input_layernorm, layer.post_attention_layernorm
        proj = [t for m in (attn.q_proj, attn.k_proj, attn.v_proj) for t in (m.weight, m.bias)]
        wo = (attn.o_proj.weight, attn.o_proj.bias)
        layers.append(
            (n1.weight, n1.variance_epsilon, *proj, *wo, n2.weight, n2.variance_epsilon, layer.mlp, attn, attn.head_dim)
        )
    return layers, (decoder.norm.weight, decoder.norm.variance_epsilon)


def _sdpa(attn: nn.Module, q, k, v, mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
