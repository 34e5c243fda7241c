"""Transformer blocks whose FFN is an MoE layer, and the stack both MoE backbones are built from.

Not a component: ``moe_transformer.py`` and ``unimoe_transformer.py`` subclass :class:`MoEStackBackbone`
with their own ``Params`` defaults. Block (pre-norm): ``h = x + Attn(N1(x)); y = h + MoE(N2(h))``.
Attention goes through ``backends.attention`` (SDPA with a key-padding mask on torch; xformers'
memory-efficient attention on packed sequences with a block-diagonal mask on CUDA).

Decoding (``supports_decoding``): :meth:`MoEStackBackbone.decode` runs new positions of an
interleaved sequence causally against a KV cache (one :class:`KVBuffer` per block, written in place, torch SDPA), so
text and codec heads generate one step per call. Positions: none by default (the encoder's states
carry them), or rotary embeddings (``positions: rope``, RoFormer, on the real-token positions) for a
stack used as a decoder.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Backbone, BackboneOutput, DecoderState
from audiomoe.core.specs import ComponentSpec, Params, Slot
from audiomoe.moe.backends import attention, resolve_backend


class MoEBackboneParams(Params):
    """Knobs shared by the MoE backbones; every MoE option lives in the ``moe`` slot, declared once (``MoELayer.Params``)."""

    num_layers: int = Field(2, ge=1, le=256, description="number of blocks")
    num_heads: int = Field(4, ge=1, le=256, description="attention heads (must divide d_model)")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="block normalisation")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention and FFN outputs")
    attention: Literal["auto", "torch", "xformers"] = Field(
        "auto", description="attention kernel: torch SDPA, or xformers' packed attention (CUDA; auto = torch)"
    )
    positions: Literal["none", "rope"] = Field(
        "none", description="rotary position embeddings on q and k (rope), or none"
    )
    moe: Annotated[ComponentSpec, Slot("moe")] = Field(
        default_factory=lambda: ComponentSpec(name="moe"),
        description="the MoE FFN of every block (router, experts, shared, null, capacity)",
    )


def rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, N, H, Dh] by its ``positions`` [B, N] (RoFormer, base 10000, rotate-half layout)."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.to(torch.float32)[..., None, None] * freq  # [B, N, 1, half]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half : 2 * half]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, x[..., 2 * half :]], -1)


class KVBuffer:
    """One block's keys and values [B, T, H, Dh] of :meth:`MoEStackBackbone.decode`, in buffers with room to grow.

    Without autograd a decoding step writes its new positions in place (no ``torch.cat`` of the whole past per
    step, which copies it); the room doubles when full. With autograd (a teacher-forced pass) the positions are
    concatenated as before, so no saved tensor is ever written over. Updated in place, as transformers' caches:
    pass the cache a call returns to one next call (:meth:`select` copies, for beams).
    """

    __slots__ = ("k", "v", "n")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        self.k, self.v, self.n = k, v, n

    @classmethod
    def start(cls, k: torch.Tensor, v: torch.Tensor) -> "KVBuffer":
        """A cache holding ``k``, ``v`` (with room for as many positions again, and at least 64, without autograd)."""
        if torch.is_grad_enabled():
            return cls(k, v, k.shape[1])
        buf = cls(k, v, 0)
        buf._grow(k.shape[1] + max(k.shape[1], 64))
        return buf._write(k, v)

    def _grow(self, cap: int) -> None:
        b, _, h, d = self.k.shape
        k, v = self.k.new_empty(b, cap, h, d), self.v.new_empty(b, cap, h, d)
        k[:, : self.n], v[:, : self.n] = self.k[:, : self.n], self.v[:, : self.n]
        self.k, self.v = k, v

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> "KVBuffer":
        n = self.n + k.shape[1]
        self.k[:, self.n : n], self.v[:, self.n : n] = k, v
        self.n = n
        return self

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions ``k``, ``v`` [B, L, H, Dh]; returns every position's keys and values so far."""
        if torch.is_grad_enabled() or self.k.requires_grad:
            self.k, self.v = torch.cat([self.k[:, : self.n], k], 1), torch.cat([self.v[:, : self.n], v], 1)
            self.n = self.k.shape[1]
        else:
            if self.n + k.shape[1] > self.k.shape[1]:
                self._grow(max(2 * self.k.shape[1], self.n + k.shape[1]))
            self._write(k, v)
        return self.k[:, : self.n], self.v[:, : self.n]

    def select(self, rows: torch.Tensor) -> "KVBuffer":
        """A new cache of batch rows ``rows`` (repeats allowed), with the same room."""
        return KVBuffer(self.k.index_select(0, rows), self.v.index_select(0, rows), self.n)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask; the backend decides the kernel."""

    def __init__(self, d_model: int, num_heads: int, backend: str, rope: bool = False) -> None:
        super().__init__()
        # auto = torch SDPA: decided once, never timed per call, so every rank runs the same kernel
        self.h, self.backend, self.rope = num_heads, "torch" if backend == "auto" else backend, rope
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def _qkv(self, x: torch.Tensor, positions: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).unbind(2)
        if self.rope:
            q, k = rotary(q, positions), rotary(k, positions)
        return q, k, v

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor], causal: bool = False) -> torch.Tensor:
        """``x`` [B, N, D]; ``padding_mask`` [B, N] True = padded; ``causal`` masks future positions."""
        b, n, d = x.shape
        positions = None
        if self.rope:
            real = (
                torch.ones(b, n, dtype=torch.long, device=x.device) if padding_mask is None else (~padding_mask).long()
            )
            positions = (real.cumsum(1) - 1).clamp_min(0)
        q, k, v = self._qkv(x, positions)
        kernel = resolve_backend(self.backend, x.device)
        out = attention(q, k, v, padding_mask, kernel, causal)
        return self.out(out.reshape(b, n, d))

    def cached(
        self, x: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor, past: Optional[KVBuffer]
    ) -> tuple[torch.Tensor, KVBuffer]:
        """Causal attention of new positions ``x`` [B, L, D] over ``past`` keys/values and their own.

        ``keep`` [B, past + L] is True at real tokens. A query attends to real keys at or before its
        column, and always to itself (a left-pad query would otherwise softmax over nothing).
        """
        b, n, d = x.shape
        q, k, v = self._qkv(x, positions)
        if past is None:
            past = KVBuffer.start(k, v)
            k, v = past.k[:, : past.n], past.v[:, : past.n]
        else:
            k, v = past.append(k, v)
        total = k.shape[1]
        cols = torch.arange(total, device=x.device)
        rows = cols[total - n :, None]
        mask = (keep[:, None, :] & (cols[None, None, :] <= rows[None])) | (cols[None, None, :] == rows[None])
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None]
        )
        return self.out(out.transpose(1, 2).reshape(b, n, d)), past


class MoEBlock(nn.Module):
    """Pre-norm Transformer block with an MoE FFN; returns ``(y, routing)``."""

    def __init__(self, d_model: int, p: MoEBackboneParams, moe: nn.Module) -> None:
        super().__init__()
        norm = nn.RMSNorm if p.norm == "rmsnorm" else nn.LayerNorm
        self.norm1, self.norm2 = norm(d_model), norm(d_model)
        self.attn = SelfAttention(d_model, p.num_heads, p.attention, rope=p.positions == "rope")
        self.moe = moe
        self.drop = nn.Dropout(p.dropout)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
        causal: bool = False,
        task_ids: Optional[torch.Tensor] = None,
    ):
        """``x`` [B, N, D] -> ``(x', routing)``; ``task_ids`` [B] goes to the MoE router."""
        x = x + self.drop(self.attn(self.norm1(x), padding_mask, causal))
        y, routing = self.moe(self.norm2(x), padding_mask, task_ids)
        return x + self.drop(y), routing

    def cached(self, x: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor, past: Optional[tuple]):
        """One decoding call: ``(x', routing, (k, v))``; the new positions' padding comes from ``keep``."""
        a, kv = self.attn.cached(self.norm1(x), keep, positions, past)
        x = x + self.drop(a)
        y, routing = self.moe(self.norm2(x), ~keep[:, -x.shape[1] :])
        return x + self.drop(y), routing, kv


class MoEStackBackbone(Backbone):
    """``num_layers`` MoE blocks + a final norm; every layer's routing and aux losses are reported."""

    Params = MoEBackboneParams
    accepts_task_ids = True
    supports_decoding = True

    def __init__(
        self, params: MoEBackboneParams, *, d_model: int, moe: Any, task_names: Optional[list[str]] = None
    ) -> None:
        super().__init__(params)
        p = self.params
        if d_model % p.num_heads:
            raise AudioMoEError(f"backbone num_heads={p.num_heads} must divide d_model={d_model}")
        self.blocks = nn.ModuleList(
            MoEBlock(d_model, p, moe(d_model=d_model, task_names=task_names)) for _ in range(p.num_layers)
        )
        self.norm = nn.RMSNorm(d_model) if p.norm == "rmsnorm" else nn.LayerNorm(d_model)

    def num_active_parameters(self) -> float:
        """All non-MoE parameters + each MoE layer's active count."""
        moe = [b.moe for b in self.blocks]
        moe_total = sum(p.numel() for m in moe for p in m.parameters())
        return sum(p.numel() for p in self.parameters()) - moe_total + sum(m.num_active_parameters() for m in moe)

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor, causal: bool = False, task_ids: Optional[torch.Tensor] = None
    ) -> BackboneOutput:
        """Run the blocks on ``x`` [B, N, D]; collect each layer's routing (``layer<i>``) and aux losses.

        ``causal=True`` makes every block's attention causal, so the stack can serve as a decoder
        (the codec head's MoE decoder). ``task_ids`` [B] reaches every layer's router (oracle and
        per-task routing at token level).
        """
        out = BackboneOutput(x)
        for i, block in enumerate(self.blocks):
            x, routing = block(x, padding_mask, causal, task_ids)
            out.routing[f"layer{i}"] = routing
            for k, v in routing.aux_losses.items():
                out.aux_losses[f"layer{i}/{k}"] = v
        out.hidden = self.norm(x)
        return out

    def decode(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any = None
    ) -> DecoderState:
        """Causal pass of new positions against the KV ``cache`` (a list of per-block :class:`KVBuffer`; None: empty)."""
        keep = attention_mask.bool()
        x, new = embeds, []
        out = DecoderState(embeds)
        for i, block in enumerate(self.blocks):
            x, routing, kv = block.cached(x, keep, position_ids, None if cache is None else cache[i])
            new.append(kv)
            out.routing[f"layer{i}"] = routing
            out.aux_losses.update({f"layer{i}/{k}": v for k, v in routing.aux_losses.items()})
        out.hidden, out.cache = self.norm(x), new
        return out

    def select_cache(self, cache: Any, rows: torch.Tensor) -> Any:
        """The per-block caches of batch rows ``rows`` (copies: the given cache is left as it is)."""
        return [kv.select(rows) for kv in cache]
