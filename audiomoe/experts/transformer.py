"""Transformer blocks whose FFN is an MoE layer, and the stack both MoE backbones are built from.

Not a component: ``moe_transformer.py`` and ``unimoe_transformer.py`` subclass :class:`MoEStackBackbone`
with their own ``Params`` defaults. Block (pre-norm): ``h = x + Attn(N1(x)); y = h + MoE(N2(h))``.
Attention goes through ``backends.attention`` (SDPA with a key-padding mask on torch; xformers'
memory-efficient attention on packed sequences with a block-diagonal mask on CUDA).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Backbone, BackboneOutput
from audiomoe.core.specs import ComponentSpec, Params, Slot
from audiomoe.experts.backends import attention, resolve_backend
from audiomoe.experts.dispatch import choose_plan
from audiomoe.experts.moe_layer import MoELayer


class MoEBackboneParams(Params):
    """Knobs shared by the MoE backbones (each backbone overrides the defaults it needs)."""

    num_layers: int = Field(2, ge=1, le=256, description="number of blocks")
    num_heads: int = Field(4, ge=1, le=256, description="attention heads (must divide d_model)")
    num_experts: int = Field(4, ge=1, le=4096, description="routed experts per MoE layer")
    num_null: int = Field(0, ge=0, le=4096, description="null experts (router columns with zero output, never computed)")
    num_shared: int = Field(0, ge=0, le=64, description="shared experts (always run)")
    shared_mode: Literal["gated", "unit"] = Field(
        "gated", description="shared weighting: gated = joint softmax with the routed mass (UniMoE-Audio), unit = weight 1 (DeepSeekMoE)"
    )
    shared_d_ff: Optional[int] = Field(None, ge=1, le=1_048_576, description="width of each shared expert (None: the expert's own)")
    capacity_factor: Optional[float] = Field(None, gt=0.0, le=64.0, description="per-expert capacity factor; None = dropless")
    drop_policy: Literal["position", "probs"] = Field("position", description="which pairs survive over capacity")
    min_capacity: int = Field(1, ge=1, description="lower bound of the per-expert capacity")
    capacity_basis: Literal["pairs", "tokens"] = Field(
        "pairs", description="capacity from selected pairs (GShard cf*k*T/E) or from valid tokens (UniMoE-Audio cf*T/E)"
    )
    renormalize_drops: bool = Field(
        False, description="after drops, rescale kept weights to the token's selected mass and gate shared experts over kept columns (UniMoE-Audio)"
    )
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="block normalisation")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention and FFN outputs")
    backend: Literal["auto", "torch", "xformers"] = Field("auto", description="compute backend (xformers: CUDA only)")
    dispatch: Literal["auto", "fused", "loop", "grouped", "slots"] = Field(
        "auto", description="expert dispatch plan (auto: fused on CPU, fastest measured on CUDA)"
    )
    router: Annotated[ComponentSpec, Slot("router")] = Field(
        default_factory=lambda: ComponentSpec(name="linear_topk"), description="routing policy of every layer"
    )
    expert: Annotated[ComponentSpec, Slot("expert")] = Field(
        default_factory=lambda: ComponentSpec(name="swiglu"), description="expert FFN kind (routed and shared)"
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask; the backend decides the kernel."""

    def __init__(self, d_model: int, num_heads: int, backend: str) -> None:
        super().__init__()
        self.h, self.backend = num_heads, backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor], causal: bool = False) -> torch.Tensor:
        """``x`` [B, N, D]; ``padding_mask`` [B, N] True = padded; ``causal`` masks future positions."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).unbind(2)
        kernel = resolve_backend(self.backend, x.device)
        if self.backend == "auto" and kernel == "xformers":
            # auto: keep xformers' packed attention only where it beats SDPA for this shape
            bucket = 1 << max(n - 1, 0).bit_length()
            key = ("attention", x.device, x.dtype, b, bucket, self.h, d // self.h, causal, padding_mask is not None)
            kernel = choose_plan(key, ["torch", "xformers"], lambda kind: attention(q, k, v, padding_mask, kind, causal))
        out = attention(q, k, v, padding_mask, kernel, causal)
        return self.out(out.reshape(b, n, d))


class MoEBlock(nn.Module):
    """Pre-norm Transformer block with an MoE FFN; returns ``(y, routing)``."""

    def __init__(self, d_model: int, p: MoEBackboneParams, moe: MoELayer) -> None:
        super().__init__()
        norm = nn.RMSNorm if p.norm == "rmsnorm" else nn.LayerNorm
        self.norm1, self.norm2 = norm(d_model), norm(d_model)
        self.attn = SelfAttention(d_model, p.num_heads, p.backend)
        self.moe = moe
        self.drop = nn.Dropout(p.dropout)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor], causal: bool = False, task_ids: Optional[torch.Tensor] = None):
        """``x`` [B, N, D] -> ``(x', routing)``; ``task_ids`` [B] goes to the MoE router."""
        x = x + self.drop(self.attn(self.norm1(x), padding_mask, causal))
        y, routing = self.moe(self.norm2(x), padding_mask, task_ids)
        return x + self.drop(y), routing


class MoEStackBackbone(Backbone):
    """``num_layers`` MoE blocks + a final norm; every layer's routing and aux losses are reported."""

    Params = MoEBackboneParams
    accepts_task_ids = True

    def __init__(
        self, params: MoEBackboneParams, *, d_model: int, router: Any, expert: Any, task_names: Optional[list[str]] = None
    ) -> None:
        super().__init__(params)
        p = self.params
        if d_model % p.num_heads:
            raise AudioMoEError(f"backbone num_heads={p.num_heads} must divide d_model={d_model}")
        self.blocks = nn.ModuleList(
            MoEBlock(
                d_model,
                p,
                MoELayer(
                    d_model=d_model,
                    num_experts=p.num_experts,
                    router=router,
                    expert=expert,
                    num_null=p.num_null,
                    num_shared=p.num_shared,
                    shared_d_ff=p.shared_d_ff,
                    shared_mode=p.shared_mode,
                    capacity_factor=p.capacity_factor,
                    drop_policy=p.drop_policy,
                    min_capacity=p.min_capacity,
                    capacity_basis=p.capacity_basis,
                    renormalize_drops=p.renormalize_drops,
                    backend=p.backend,
                    dispatch=p.dispatch,
                    task_names=task_names,
                ),
            )
            for _ in range(p.num_layers)
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
