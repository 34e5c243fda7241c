"""The UniMoE-Audio backbone: a Transformer whose FFNs are Dynamic-Capacity MoE layers.

UniMoE-Audio (arXiv 2510.13344; code HITsz-TMG/Uni-MoE, ``UniMoE_Audio_core.py``): top-p routing
(p = 0.7) over routed + null columns, so each token uses a variable number of experts; null experts
are never computed; two shared experts always run and are gated by a joint softmax with the routed
mass: ``g = softmax([selected routed+null logits, shared logits])``, routed weights ``w * sum g_dyn``,
shared ``g_s``. Paper layout: 8 routed, 1 null, 2 shared. RMSNorm, SwiGLU experts (Qwen2.5 blocks).
Block: ``h = x + Attn(RMSNorm(x)); y = h + MoE(RMSNorm(h))``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from audiomoe.core.specs import ComponentSpec, Slot
from audiomoe.experts.transformer import MoEBackboneParams, MoEStackBackbone


class UniMoETransformer(MoEStackBackbone):
    """MoE Transformer with UniMoE-Audio's defaults: top-p, 8 routed + 1 null + 2 gated shared experts."""

    class Params(MoEBackboneParams):
        num_experts: int = Field(8, ge=1, le=4096, description="routed experts per MoE layer")
        num_null: int = Field(1, ge=0, le=4096, description="null experts (router columns with zero output, never computed)")
        num_shared: int = Field(2, ge=0, le=64, description="shared experts (always run)")
        norm: Literal["layernorm", "rmsnorm"] = Field("rmsnorm", description="block normalisation")
        router: Annotated[ComponentSpec, Slot("router")] = Field(
            default_factory=lambda: ComponentSpec(name="top_p"), description="routing policy of every layer (top-p, UniMoE)"
        )
