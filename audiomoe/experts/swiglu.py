"""SwiGLU expert (Shazeer 2020, "GLU Variants Improve Transformer"; the FFN of LLaMA, Qwen, DeepSeekMoE).

``FFN(x) = W_down (silu(W_gate x) * W_up x)``, no biases. ``W_gate`` and ``W_up`` are stored as
one fused ``w_in`` [2 * d_ff, d_model] (rows ``[0, d_ff)`` gate, ``[d_ff, 2 d_ff)`` up). Inside an
MoE layer the experts of this kind are one grouped module with stacked weights
(:class:`audiomoe.moe.grouped.GroupedSwiGLU`, the transformers v5 layout), see
:meth:`SwiGLUExpert.grouped`. Any width: a fine-grained expert
(DeepSeekMoE) is the same with ``d_ff = d_ff_dense / m``. A parent may inject ``d_ff`` (the MoE layer
does for shared experts with their own width); the injected value wins over the param.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from audiomoe.core.interfaces import Expert
from audiomoe.core.specs import Params
from audiomoe.moe.grouped import GroupedSwiGLU


class SwiGLUExpert(Expert):
    """Bias-free gated FFN [N, d_model] -> [N, d_model]."""

    class Params(Params):
        d_ff: Optional[int] = Field(None, ge=1, le=1_048_576, description="hidden width (default 4 * d_model)")

    def __init__(self, params: Params, *, d_model: int, d_ff: Optional[int] = None) -> None:
        super().__init__(params)
        self.d_model = d_model
        self.d_ff = d_ff or self.params.d_ff or 4 * d_model
        self.w_in = nn.Linear(d_model, 2 * self.d_ff, bias=False)
        self.w_out = nn.Linear(self.d_ff, d_model, bias=False)

    @classmethod
    def grouped(cls, params: Params, *, num_experts: int, d_model: int, d_ff: Optional[int] = None) -> GroupedSwiGLU:
        """``num_experts`` SwiGLU experts with stacked weights (what the MoE layer holds and the fused dispatch runs)."""
        return GroupedSwiGLU(num_experts, d_model, d_ff or params.d_ff or 4 * d_model)

    def swiglu_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_in [2 d_ff, d_model], w_out [d_model, d_ff])``: one expert's slice of the grouped layout."""
        return self.w_in.weight, self.w_out.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the FFN to tokens ``x`` [N, d_model]."""
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)
