"""Grouped experts: all routed (or shared) experts of one MoE layer as one module.

``GroupedSwiGLU`` stacks ``E`` SwiGLU experts (Shazeer 2020) in the transformers v5 layout of
``MixtralExperts``: ``gate_up_proj`` [E, 2F, D] (rows ``[0, F)`` the gate, ``[F, 2F)`` the up
projection) and ``down_proj`` [E, D, F], so ``FFN_e(x) = down_e (silu(gate_e x) * up_e x)`` and a
state dict maps one to one onto a transformers MoE block (torchtitan's ``GroupedExperts`` holds the
same stacked ``[E, F, D]`` parameters). The dispatcher runs these weights directly: the fused CPU
node, ``F.grouped_mm`` on CUDA, or a per-expert reference loop; nothing is stacked per call.

An expert kind offers a grouped form through ``Expert.grouped`` (a classmethod); a kind without
one (any plugin expert) is held in ``LoopExperts``, one module per expert, run by a per-expert loop.
:func:`build_experts` picks between the two from the expert's class.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from audiomoe.core.errors import AudioMoEError


def grouped_mm_usable(d_model: int, d_ff: int, dtype: torch.dtype) -> bool:
    """Whether ``F.grouped_mm`` exists and the shapes meet its 16-byte stride rule."""
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return (d_model * size) % 16 == 0 and (d_ff * size) % 16 == 0


class GroupedSwiGLU(nn.Module):
    """``num_experts`` bias-free SwiGLU FFNs with stacked weights (transformers v5 ``MixtralExperts`` layout)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        # nn.Linear's default init per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(d_ff), 1 / math.sqrt(d_ff))

    def __len__(self) -> int:
        return self.num_experts

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}"

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens ``x`` [N, D] (the reference path)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward_sorted(self, xs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Expert ``e`` on its slice of the expert-sorted rows ``xs`` [S, D] -> [S, D] (a per-expert loop)."""
        outs = [self.expert_forward(e, c) for e, c in enumerate(xs.split(list(counts))) if counts[e]]
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])

    def forward_grouped_mm(self, xs: torch.Tensor, counts: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
        """The same through ``F.grouped_mm`` over the stacked weights (CUDA Hopper's grouped GEMM; CPU has one too).

        ``counts``: each expert's rows, or (a tensor) their int32 end offsets already.
        """
        if isinstance(counts, torch.Tensor):
            offs = counts
        else:
            offs = torch.tensor(list(counts), device=xs.device).cumsum(0).to(torch.int32)
        h = F.grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs=offs)
        g, u = h.chunk(2, dim=-1)
        act = (F.silu(g) * u).contiguous()  # grouped_mm needs 16-byte aligned, non-expanded operands
        return F.grouped_mm(act, self.down_proj.transpose(-2, -1), offs=offs)

    def forward_gathered(self, xs: torch.Tensor, exp: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``w_p FFN_{e_p}(xs_p)`` [S, D] for pairs in any order, each pair's weights gathered (one batched GEMV each way).

        Copies ``S x 3FD`` weights, so the dispatcher uses it only for a few pairs (a decoding step).
        """
        h = torch.bmm(self.gate_up_proj.index_select(0, exp), xs.unsqueeze(-1)).squeeze(-1)
        g, u = h.chunk(2, dim=-1)
        act = F.silu(g) * u * w.to(h.dtype).unsqueeze(-1)
        return torch.bmm(self.down_proj.index_select(0, exp), act.unsqueeze(-1)).squeeze(-1)

    def forward_picked(self, x: torch.Tensor, picked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_{e picked} w_e FFN_e(x)`` [N, D]: each picked expert on its own tokens through views of the weights.

        ``picked`` [N, E] bool, ``weights`` [N, E]. No weight is copied; the picks are read on the host (free
        on CPU), so this is the CPU plan of a few-token call (a decoding step): one token runs its experts
        directly (weights as Python floats), a few tokens go through their pairs in expert order once.
        Every row sums its experts in column order, so the output is the same whichever branch runs.
        """
        w = weights if weights.dtype == x.dtype else weights.to(x.dtype)
        # one token without autograd (a Python float weight carries no gradient): picks and weights read on the
        # host once, summed in column order
        if x.shape[0] == 1 and not (torch.is_grad_enabled() and w.requires_grad):
            out = None
            for e, (hit, we) in enumerate(zip(picked.tolist()[0], w.tolist()[0])):
                if hit:  # a Python float times a float32 tensor is the float32 product, as the tensor weight's
                    y = self.expert_forward(e, x) * we
                    out = y if out is None else out + y
            return x.new_zeros(x.shape) if out is None else out
        # a few tokens: one pass over the (expert, token) pairs in expert order (one gather, one scatter, each expert
        # once on its rows), not a gather and a scatter per expert; a row still sums its experts in column order
        exp, tok = picked.t().nonzero(as_tuple=True)
        xs = x.index_select(0, tok)
        if grouped_mm_usable(self.d_model, self.d_ff, x.dtype):
            # two grouped GEMMs over all experts, offsets from the picks: no per-expert call, no host read (measured
            # at 4 tokens, 8 x 512 at width 256, 2 CPU threads: 543 us against 706 us; the same products bit for bit)
            ys = self.forward_grouped_mm(xs, picked.sum(0).cumsum(0).to(torch.int32))
        else:
            ys = self.forward_sorted(xs, picked.sum(0).tolist())
        return x.new_zeros(x.shape).index_add_(0, tok, ys * w[tok, exp].unsqueeze(-1))

    def forward_all(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_e w_e FFN_e(x)`` over every expert on every token (shared experts); ``weights`` [N, E] or None = 1.

        One GEMM over all experts' gate|up rows, one batched GEMM down: three ops whatever ``E``.
        """
        e, f = self.num_experts, self.d_ff
        g, u = F.linear(x, self.gate_up_proj.reshape(e * 2 * f, -1)).view(-1, e, 2 * f).chunk(2, dim=-1)
        act = F.silu(g) * u
        if weights is not None:  # the down projection is linear: weighting the activation weights the output
            act = act * (weights if weights.dtype == act.dtype else weights.to(act.dtype)).unsqueeze(-1)
        return torch.bmm(act.transpose(0, 1), self.down_proj.transpose(1, 2)).sum(0)

    @torch.no_grad()
    def load_expert(self, e: int, w_in: torch.Tensor, w_out: torch.Tensor) -> None:
        """Set expert ``e`` from ``w_in`` [2F, D] (gate rows, then up rows) and ``w_out`` [D, F]."""
        self.gate_up_proj[e].copy_(w_in)
        self.down_proj[e].copy_(w_out)

    def num_expert_parameters(self) -> int:
        """Parameters of one expert."""
        return 3 * self.d_model * self.d_ff


class LoopExperts(nn.ModuleList):
    """Experts of a kind without a grouped form: one module each, run one after the other."""

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on ``x`` [N, D]; a wrong output shape is named (class, expected, actual)."""
        y = self[e](x)
        if y.shape != x.shape:
            raise AudioMoEError(
                f"expert {type(self[e]).__name__} returned shape {tuple(y.shape)} for input {tuple(x.shape)}; "
                "experts must map [N, d_model] -> [N, d_model]"
            )
        return y

    def forward_sorted(self, xs: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Expert ``e`` on its slice of the expert-sorted rows ``xs`` [S, D] -> [S, D]."""
        outs = [self.expert_forward(e, c) for e, c in enumerate(xs.split(list(counts))) if counts[e]]
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])

    def forward_all(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_e w_e FFN_e(x)`` over every expert (shared experts); ``weights`` [N, E] or None = 1."""
        y = None
        for e in range(len(self)):
            ye = self.expert_forward(e, x)
            ye = ye if weights is None else ye * weights[:, e : e + 1].to(ye.dtype)
            y = ye if y is None else y + ye
        return y

    def num_expert_parameters(self) -> float:
        """Mean parameters per expert."""
        return sum(p.numel() for p in self.parameters()) / max(len(self), 1)


def build_experts(builder: Any, num_experts: int, d_model: int, d_ff: Optional[int] = None) -> nn.Module:
    """``num_experts`` experts of ``builder``'s kind: its grouped form when the class offers one, else a loop.

    ``d_ff`` (shared experts' own width) is injected into each expert when given.
    """
    extra = {} if d_ff is None else {"d_ff": d_ff}
    cls = getattr(builder, "cls", None)
    grouped = getattr(cls, "grouped", None)
    params = getattr(getattr(builder, "node", None), "params", None)
    if callable(grouped) and params is not None:
        group = grouped(params, num_experts=num_experts, d_model=d_model, **extra)
        if group is not None:
            return group
    return LoopExperts([builder(d_model=d_model, **extra) for _ in range(num_experts)])
