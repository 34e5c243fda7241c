"""Dense selection (soft mixture, as in MoWE's data-independent weighting): every column, weights = softmax.

``w_i = P_i = softmax(logits)_i`` for all i; nothing is skipped, weights sum to 1.
"""

from __future__ import annotations

import torch

from audiomoe.core.specs import Params
from audiomoe.routers.base import Selection, Selector


class Dense(Selector):
    """All columns, weighted by the softmax."""

    class Params(Params):
        pass

    def forward(self, logits: torch.Tensor) -> Selection:
        """Select every column; weights are the softmax probabilities."""
        probs = logits.softmax(-1)
        return Selection(torch.ones_like(probs, dtype=torch.bool), probs, probs)
