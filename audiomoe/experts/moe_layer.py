"""Mixture-of-experts FFN layer: a router picks experts per token, outputs are combined by weight.

``y_t = sum_{e in S(t)} w_{t,e} FFN_e(x_t)`` (Shazeer et al. 2017). Dispatch is dropless: the
(token, expert) pairs are sorted by expert and each expert runs once on its contiguous slice;
the weighted outputs are scattered back with ``index_add``. Padded tokens are neither routed
nor counted. The router and the experts are injected (built by the composer from the registry).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from audiomoe.core.interfaces import Routing


class MoELayer(nn.Module):
    """Router + ``num_experts`` experts over tokens [B, N, D] (or [N, D])."""

    def __init__(self, *, d_model: int, num_experts: int, router: Any, expert: Any) -> None:
        super().__init__()
        self.d_model, self.num_experts = d_model, num_experts
        self.router = router(d_model=d_model, num_experts=num_experts)
        self.experts = nn.ModuleList([expert(d_model=d_model) for _ in range(num_experts)])

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Routing]:
        """Return the layer output (same shape as ``x``) and the routing record."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        item_mask = None if padding_mask is None else ~padding_mask.reshape(-1)
        routing = self.router(tokens, item_mask=item_mask)
        tok, exp = routing.mask.nonzero(as_tuple=True)
        order = torch.argsort(exp, stable=True)
        tok, exp = tok[order], exp[order]
        counts = torch.bincount(exp, minlength=self.num_experts).tolist()
        chunks = tokens.index_select(0, tok).split(counts)
        outs = [self.experts[e](c) for e, c in enumerate(chunks) if counts[e] > 0]
        y = torch.cat(outs) if outs else tokens.new_zeros(0, shape[-1])
        y = y * routing.weights[tok, exp].unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(tokens).index_add(0, tok, y)
        return out.reshape(shape), routing

    def num_active_parameters(self) -> float:
        """Router + the experts an average valid token uses (measured from the last routing if any)."""
        router = sum(p.numel() for p in self.router.parameters())
        per_expert = sum(p.numel() for p in self.experts[0].parameters()) if len(self.experts) else 0
        k = getattr(self.router.params, "k", 1) if hasattr(self.router, "params") else 1
        return router + per_expert * min(k, self.num_experts)
