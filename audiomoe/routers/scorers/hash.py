"""Hash scorer (ablation baseline, after Hash Layers, Roller et al. 2021): a fixed, untrained assignment.

Audio has no token ids to hash, so the hash is locality-sensitive: a fixed random projection
``R`` [D, E] (seeded, never trained) and ``column = argmax(x R)``; similar frames share a column.
Logits are ``margin`` at that column, 0 elsewhere (top-1 picks it). Sequences are mean-pooled
over valid frames first.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from audiomoe.core.specs import Params
from audiomoe.routers.base import Scorer
from audiomoe.routers.functional import masked_mean


class HashScorer(Scorer):
    """Random-hyperplane hash of the input to one column."""

    class Params(Params):
        seed: int = Field(0, ge=0, description="seed of the fixed random projection")
        margin: float = Field(10.0, gt=0.0, le=1000.0, description="logit of the hashed column (others 0)")

    def __init__(self, params: Params, *, d_model: int, num_experts: int) -> None:
        super().__init__(params)
        gen = torch.Generator().manual_seed(self.params.seed)
        self.register_buffer("projection", torch.randn(d_model, num_experts, generator=gen), persistent=False)

    def forward(
        self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Logits [N, E] with ``margin`` at each item's hashed column."""
        x = masked_mean(inputs, item_mask) if inputs.dim() == 3 else inputs
        with torch.no_grad():
            cols = (x.float() @ self.projection.float()).argmax(-1, keepdim=True)
        return x.new_zeros(x.shape[0], self.projection.shape[1]).scatter(-1, cols, self.params.margin)
