"""Data-dependent scorer: a linear gate or an MLP over the item's representation.

Token routing (Shazeer et al. 2017; UniMoE-Audio's ``gate = Linear(d, E, bias=False)``):
``logits = W x``. With ``depth >= 1`` an MLP ``W_out act(... act(W_1 norm(x)))`` (MoE++'s router:
``Linear(D, 8E) -> Tanh -> Linear(8E, E)``). Encoder routing (MoWE-Audio's data-dependent router):
a sequence [B, T, D] is first pooled over its valid frames, by mean (MoWE: "the time-average of
the base-encoder features") or attention pooling (a learned query, ``softmax(q.x_t / sqrt(D))``).
``fp32`` computes the gate in float32: ``True`` always, ``"train"`` in training only (UniMoE-Audio's
``fp32_gate``, which the released code applies when ``self.training``).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from audiomoe.core.specs import Params
from audiomoe.routers.base import Scorer
from audiomoe.routers.functional import masked_mean

_ACTS = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class MLPScorer(Scorer):
    """``depth`` hidden layers (0: a linear gate) over the (pooled) input."""

    class Params(Params):
        depth: int = Field(1, ge=0, le=8, description="hidden layers (0: a single linear gate)")
        width: Optional[int] = Field(None, ge=1, le=65536, description="hidden width (None: 8 x columns, as MoE++)")
        activation: Literal["tanh", "gelu", "relu", "silu"] = Field("tanh", description="hidden activation")
        bias: bool = Field(False, description="bias on the output layer (hidden layers always have one)")
        input_norm: Literal["none", "layernorm", "rmsnorm"] = Field("none", description="normalise the input first")
        fp32: Union[bool, Literal["train"]] = Field(
            False,
            description="compute the scorer in float32: true = always, 'train' = in training only (UniMoE-Audio's fp32_gate)",
        )
        pooling: Literal["mean", "attention"] = Field(
            "mean", description="how a [B, T, D] sequence is pooled over valid frames"
        )

    def __init__(self, params: Params, *, d_model: int, num_experts: int) -> None:
        super().__init__(params)
        p = self.params
        width = p.width or 8 * num_experts
        dims = [d_model] + [width] * p.depth + [num_experts]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=(i < p.depth) or p.bias) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
        )
        self.norm: Optional[nn.Module] = {
            "none": None,
            "layernorm": nn.LayerNorm(d_model),
            "rmsnorm": nn.RMSNorm(d_model),
        }[p.input_norm]
        self.query = nn.Parameter(torch.zeros(d_model)) if p.pooling == "attention" else None

    def pool(self, x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Pool a sequence [B, T, D] over its valid frames -> [B, D]."""
        if self.query is None:
            return masked_mean(x, valid)
        scores = (x @ self.query.to(x.dtype)) / math.sqrt(x.shape[-1])
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
            # An all-padded sample would softmax to NaN; give it uniform (harmless) attention.
            scores = torch.where(valid.any(-1, keepdim=True), scores, torch.zeros_like(scores))
        return (scores.softmax(-1)[..., None] * x).sum(1)

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """float32 when the fp32 gate is on (``"train"``: only in training), else ``dtype``."""
        fp32 = self.params.fp32
        return torch.float32 if fp32 is True or (fp32 == "train" and self.training) else dtype

    def forward(
        self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits [N, E] from tokens [N, D] or pooled sequences [N, T, D]."""
        dtype = self.compute_dtype(inputs.dtype)
        h = _as(inputs, dtype)
        if h.dim() == 3:
            h = self.pool(h, item_mask)
        if self.norm is not None:
            h = self.norm(h)
        act = _ACTS[self.params.activation]
        for i, layer in enumerate(self.layers):
            if i:
                h = act(h)
            bias = None if layer.bias is None else _as(layer.bias, dtype)
            h = F.linear(h, _as(layer.weight, dtype), bias)
        return h


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``; no op at all when it already is (a decoding step calls the gate once per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


class LinearScorer(MLPScorer):
    """The plain linear gate ``logits = W x`` (the ``mlp`` scorer with ``depth=0`` by default)."""

    class Params(MLPScorer.Params):
        depth: int = Field(0, ge=0, le=8, description="hidden layers (0: a single linear gate)")
