"""Base classes of a router's two halves: what it looks at (``Scorer``) and how many it picks (``Selector``).

A composite router (``scored`` and its registry presets ``top_k``, ``top_p``, ...) holds one of each as slots, so
an ablation crosses them by config: ``--set backbone.moe.router.scorer=mlp --set backbone.moe.router.selector=top_p``.

- ``Scorer``: inputs [N, D] (tokens or samples; ``item_mask`` [N]) or sequences [N, T, D]
  (``item_mask`` [N, T] True = valid frame, for per-sample encoder routing: a data-dependent
  scorer pools over valid frames) -> logits [N, E]. ``d_model``, ``num_experts`` (E, the number
  of columns) and ``task_names`` are injected when the constructor names them.
- ``Selector``: float32 logits [N, E] -> :class:`Selection` (mask, combine weights, the softmax).
  ``num_experts`` is injected when asked for (to check k against it at build time).

These kinds have no base class in ``audiomoe.core``; plugins that add a scorer or selector
subclass these.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Optional

import torch

from audiomoe.core.interfaces import Component


class Selection(NamedTuple):
    """A selector's decision: ``mask`` [N, E] bool, ``weights`` [N, E] (0 off the mask), ``probs`` = softmax(logits)."""

    mask: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor


class Scorer(Component):
    """What a router looks at: item representations (or the task) -> logits over E columns."""

    kind: ClassVar[str] = "scorer"

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype this scorer computes in for inputs of ``dtype`` (an fp32 gate: float32).

        The composite router casts its input to it *before* the training jitter, as UniMoE-Audio's
        code does (``h = x.float()`` then ``h *= U(1 - eps, 1 + eps)``). Default: the input's dtype.
        """
        return dtype

    def forward(
        self,
        inputs: torch.Tensor,
        item_mask: Optional[torch.Tensor] = None,
        task_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:  # pragma: no cover
        """Score ``inputs`` [N, D] or [N, T, D] -> logits [N, E]."""
        raise NotImplementedError


class Selector(Component):
    """How many a router picks: logits [N, E] -> a :class:`Selection`."""

    kind: ClassVar[str] = "selector"

    def forward(self, logits: torch.Tensor) -> Selection:  # pragma: no cover
        """Select columns for each item from float32 ``logits`` [N, E]."""
        raise NotImplementedError
