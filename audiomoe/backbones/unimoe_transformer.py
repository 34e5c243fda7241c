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

from audiomoe.backbones.blocks import MoEBackboneParams, MoEStackBackbone
from audiomoe.core.specs import ComponentSpec, Slot

#: UniMoE-Audio's MoE block (Table II): top-p 0.7 over 8 routed + 1 null columns, 2 gated shared experts.
UNIMOE_MOE = {"router": {"name": "top_p"}, "num_experts": 8, "num_null": 1, "num_shared": 2, "shared_mode": "gated"}


class UniMoETransformer(MoEStackBackbone):
    """MoE Transformer with UniMoE-Audio's defaults: top-p, 8 routed + 1 null + 2 gated shared experts."""

    class Params(MoEBackboneParams):
        norm: Literal["layernorm", "rmsnorm"] = Field("rmsnorm", description="block normalisation")
        moe: Annotated[ComponentSpec, Slot("moe")] = Field(
            default_factory=lambda: ComponentSpec(name="moe", params=dict(UNIMOE_MOE)),
            description="the MoE FFN of every block (UniMoE-Audio: top-p, 8 routed + 1 null + 2 gated shared)",
        )
