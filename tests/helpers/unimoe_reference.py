"""UniMoE-Audio's MoE block written from its published semantics (shared/reference/papers.md §2.3-2.4).

Deliberately independent of audiomoe's routing code: one gate over routed + null + shared columns,
fp32 cast and input jitter on the gate input (training), dynamic k from the sorted probabilities,
SparseMixer multipliers computed token by token exactly as the pseudo-code (ranking by ``torch.max``
of the logits, near-tie test ``(m - s_j) / max(|s_j|, |m|) > 2 eps`` without any clamp),
``w = mult / (sum mult + 1e-6)``, the joint softmax for the shared experts, the output on the
un-jittered input, and the aux loss with P renormalised over the selected set.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


def sparse_mixer_row(scores: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """Multipliers [E_dyn] of one token's ``k`` picks (deterministic SparseMixer, papers.md §2.3 step 3)."""
    masked = scores
    mult = torch.zeros_like(scores)
    for _ in range(k):
        with torch.no_grad():
            m, am = masked.max(-1)
            factor = scores.abs().clamp(min=m.abs())
            drop = ((m - scores) / factor) > (2 * eps)
        gates = masked.masked_fill(drop, -math.inf)
        mult = mult + torch.zeros_like(mult).index_put((am[None],), gates.softmax(-1)[am][None])
        masked = masked.index_put((am[None],), torch.tensor(-math.inf, dtype=masked.dtype))
    return mult


def unimoe_block(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    shared: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    num_null: int,
    top_p: float = 0.7,
    eps: float = 0.01,
    jitter: float = 0.01,
    training: bool = True,
    fp32_gate: bool = True,
) -> dict[str, torch.Tensor]:
    """Output [T, D], logits [T, E], k [T], expert mask [T, E], final weights [T, E] and aux loss for tokens ``x`` [T, D]."""
    e_r, e_s = len(experts), len(shared)
    e_dyn = e_r + num_null
    h = x.float() if (training and fp32_gate) else x
    h = h.clone()  # the released code jitters in place; cloning avoids its fp32 aliasing quirk (papers.md §2.3 NB)
    if training:
        h = h * torch.empty_like(h).uniform_(1.0 - jitter, 1.0 + jitter)
    w_g = gate_weight.float() if (training and fp32_gate) else gate_weight
    logits = h @ w_g.t()
    s = logits[:, :e_dyn].softmax(-1)
    c = s.sort(-1, descending=True).values.cumsum(-1)
    k = (~(c >= top_p)).sum(-1) + 1
    rows = [sparse_mixer_row(logits[t, :e_dyn], int(k[t]), eps) for t in range(x.shape[0])]
    mult = torch.stack(rows)
    w = mult / (mult.sum(-1, keepdim=True) + 1e-6)
    expert_mask = torch.cat([mult > 0, torch.ones(x.shape[0], e_s, dtype=torch.bool)], -1)
    g = logits.masked_fill(~expert_mask, -math.inf).softmax(-1)
    w_final = torch.cat([w * g[:, :e_dyn].sum(-1, keepdim=True), g[:, e_dyn:]], -1)
    y = torch.zeros_like(x)
    for e, f in enumerate(experts):
        rows_e = expert_mask[:, e].nonzero().flatten()
        if rows_e.numel():
            y = y.index_add(0, rows_e, f(x[rows_e]) * w_final[rows_e, e : e + 1].to(x.dtype))
    for j, f in enumerate(shared):
        y = y + f(x) * w_final[:, e_dyn + j : e_dyn + j + 1].to(x.dtype)
    dyn_mask = expert_mask[:, :e_dyn]
    restricted = logits[:, :e_dyn].masked_fill(~dyn_mask, torch.finfo(logits.dtype).min).softmax(-1)
    aux = e_dyn * (dyn_mask.float().mean(0) * restricted.mean(0)).sum()
    return {"y": y, "logits": logits, "k": k, "mask": dyn_mask, "weights": w_final, "aux": aux}
