"""A pre-norm Transformer encoder whose FFNs are MoE layers (Switch Transformer / GShard layout).

Block: ``h = x + MHA(LN(x)); y = h + MoE(LN(h))``. The router and expert kinds are slots, so
``--set backbone.router=<name>`` swaps the routing policy of every layer at once. Each layer's
routing record goes into the model's routing trace as ``layer<i>``.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.interfaces import Backbone, BackboneOutput
from audiomoe.core.specs import ComponentSpec, Params, Slot
from audiomoe.experts.moe_layer import MoELayer


class _Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float, moe: MoELayer) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.moe = moe
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor):
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        x = x + self.drop(a)
        y, routing = self.moe(self.ln2(x), pad)
        return x + self.drop(y), routing


class MoETransformer(Backbone):
    """``num_layers`` Transformer blocks with MoE FFNs; router and expert chosen from the registry."""

    class Params(Params):
        num_layers: int = Field(2, ge=1, description="number of blocks")
        num_heads: int = Field(4, ge=1, description="attention heads (must divide d_model)")
        num_experts: int = Field(4, ge=1, description="experts per MoE layer")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on attention and FFN outputs")
        router: Annotated[ComponentSpec, Slot("router")] = Field(
            default_factory=lambda: ComponentSpec(name="linear_topk"), description="routing policy of every layer"
        )
        expert: Annotated[ComponentSpec, Slot("expert")] = Field(
            default_factory=lambda: ComponentSpec(name="mlp"), description="expert FFN kind"
        )

    def __init__(self, params: Params, *, d_model: int, router: Any, expert: Any) -> None:
        super().__init__(params)
        p = self.params
        if d_model % p.num_heads:
            raise ValueError(f"backbone num_heads={p.num_heads} must divide d_model={d_model}")
        self.blocks = nn.ModuleList(
            _Block(d_model, p.num_heads, p.dropout, MoELayer(d_model=d_model, num_experts=p.num_experts, router=router, expert=expert))
            for _ in range(p.num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> BackboneOutput:
        """Run the blocks; collect every layer's aux losses and routing record."""
        out = BackboneOutput(x)
        for i, block in enumerate(self.blocks):
            x, routing = block(x, padding_mask)
            out.routing[f"layer{i}"] = routing
            for k, v in routing.aux_losses.items():
                out.aux_losses[f"layer{i}/{k}"] = v
        out.hidden = self.norm(x)
        return out
