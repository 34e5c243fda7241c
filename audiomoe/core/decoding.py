"""The decoding records of the backbone contract: what ``Backbone.decode`` returns, and its position rule.

Both seed designs are one decoder shared by many tasks (MoWE-Audio: one LLM behind the adapter;
UniMoE-Audio: one MoE language model writing codec tokens). ``Backbone.forward`` reads the adapted
audio alone; ``Backbone.decode`` runs one interleaved, left-padded sequence
``[prompt tokens | audio soft tokens | codec-frame embeddings]`` causally and returns a KV cache,
so a head generates one token (or codec frame) per call instead of re-running the prefix.

Sequence convention (Hugging Face's): ``attention_mask`` [B, past + L] is 1 at real tokens and
covers every cached position; ``position_ids`` [B, L] count real tokens only, so a left-padded row
starts at position 0 at its first real token.

Generation mode (:func:`generation_mode`, entered by every head's ``generate``): no loss is taken,
so routers skip their aux losses and MoE layers may pick a no-autograd dispatch; a decoding step
then costs the ops that produce the output and little else.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

if TYPE_CHECKING:
    from audiomoe.core.routing import Routing


@dataclass
class DecoderState:
    """One :meth:`Backbone.decode` call: ``hidden`` [B, L, D] of the new positions, the ``cache`` to pass
    to the next call (None when caching is off), and the routed layers' aux losses and records."""

    hidden: torch.Tensor
    cache: Any = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: dict[str, "Routing"] = field(default_factory=dict)


def positions_from_mask(attention_mask: torch.Tensor, new: Optional[int] = None) -> torch.Tensor:
    """Position ids of the last ``new`` columns (default: all) of ``attention_mask`` [B, L], real tokens counted from 0."""
    pos = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    return pos if new is None else pos[:, pos.shape[1] - new :]


_GENERATING = contextvars.ContextVar("audiomoe_generating", default=False)


@contextmanager
def generation_mode() -> Iterator[None]:
    """Mark the enclosed calls as generation: no loss will be taken (aux losses are skipped); nests, per thread."""
    token = _GENERATING.set(True)
    try:
        yield
    finally:
        _GENERATING.reset(token)


def is_generating() -> bool:
    """Whether the caller runs inside :func:`generation_mode`."""
    return _GENERATING.get()
