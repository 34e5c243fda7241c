"""Plain two-layer MLP expert: ``W2 act(W1 x + b1) + b2`` (the Transformer FFN, Vaswani et al. 2017).

Width ``d_ff`` defaults to ``4 * d_model``; a fine-grained expert (DeepSeekMoE) is the same with
a smaller ``d_ff``.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.interfaces import Expert
from audiomoe.core.specs import Params

_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class MLPExpert(Expert):
    """Token FFN [N, d_model] -> [N, d_model]."""

    class Params(Params):
        d_ff: Optional[int] = Field(None, ge=1, description="hidden width (default 4 * d_model)")
        activation: Literal["gelu", "relu", "silu"] = Field("gelu", description="hidden activation")
        bias: bool = Field(True, description="use biases")

    def __init__(self, params: Params, *, d_model: int, d_ff: Optional[int] = None) -> None:
        super().__init__(params)
        # a parent may inject d_ff (e.g. shared experts with their own width); it wins over the param
        d_ff = d_ff or self.params.d_ff or 4 * d_model
        self.d_ff = d_ff
        self.fc1 = nn.Linear(d_model, d_ff, bias=self.params.bias)
        self.act = _ACTS[self.params.activation]()
        self.fc2 = nn.Linear(d_ff, d_model, bias=self.params.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the FFN to tokens ``x`` [N, d_model]."""
        return self.fc2(self.act(self.fc1(x)))
