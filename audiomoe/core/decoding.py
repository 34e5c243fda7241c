"""The backbone contract: the decoder every task shares, its KV-cached decoding and the records it returns.

Both seed designs are one decoder shared by many tasks (MoWE-Audio: one LLM behind the adapter;
UniMoE-Audio: one MoE language model writing codec tokens). ``Backbone.forward`` reads the adapted
audio alone; ``Backbone.decode`` runs one interleaved, left-padded sequence
``[prompt tokens | audio soft tokens | codec-frame embeddings]`` causally and returns a KV cache,
so a head generates one token (or codec frame) per call instead of re-running the prefix.

Sequence convention (Hugging Face's): ``attention_mask`` [B, past + L] is 1 at real tokens and
covers every cached position; ``position_ids`` [B, L] count real tokens only, so a left-padded row
starts at position 0 at its first real token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch

from .interfaces import Component, Routing


@dataclass
class DecoderState:
    """One :meth:`Backbone.decode` call: ``hidden`` [B, L, D] of the new positions, the ``cache`` to pass
    to the next call (None when caching is off), and the routed layers' aux losses and records."""

    hidden: torch.Tensor
    cache: Any = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: dict[str, Routing] = field(default_factory=dict)


def positions_from_mask(attention_mask: torch.Tensor, new: Optional[int] = None) -> torch.Tensor:
    """Position ids of the last ``new`` columns (default: all) of ``attention_mask`` [B, L], real tokens counted from 0."""
    pos = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    return pos if new is None else pos[:, pos.shape[1] - new :]



@dataclass
class BackboneOutput:
    """Hidden states [B, N, D] plus auxiliary losses and routing records by layer name."""

    hidden: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: dict[str, Routing] = field(default_factory=dict)


class Backbone(Component):
    """The decoder every task shares: [B, N, d_model] -> [B, N, d_model], and (``supports_decoding``) a KV-cached decoder.

    ``d_model`` and ``task_names`` are injected when the constructor names them. A backbone whose
    class sets ``accepts_task_ids = True`` also gets ``task_ids`` [B] (index into ``task_names``),
    so its routers can condition on the task. ``forward`` reads the audio alone (classification
    and CTC heads); :meth:`decode` runs one interleaved sequence ``[prompt tokens | audio soft
    tokens | codec embeddings]`` causally with a KV cache (text and codec heads, see
    :mod:`audiomoe.core.decoding`). A backbone with a text vocabulary also sets ``tokenizer`` and
    implements :meth:`embed_tokens` / :meth:`text_logits`.
    """

    kind: ClassVar[str] = "backbone"
    accepts_task_ids: ClassVar[bool] = False
    #: True when :meth:`decode` is implemented (heads with ``reads_decoder`` need it)
    supports_decoding: ClassVar[bool] = False
    #: the text tokenizer of a backbone with a vocabulary (a causal LM); None: no text in or out
    tokenizer: Any = None

    def num_active_parameters(self) -> Optional[float]:
        """Parameters used per token on average (None: all of them)."""
        return None

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> BackboneOutput:  # pragma: no cover
        """Transform ``x`` [B, N, D]; ``padding_mask`` [B, N] is True at padded frames (see ``accepts_task_ids``)."""
        raise NotImplementedError

    def decode(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any = None) -> Any:
        """Causal pass over new positions ``embeds`` [B, L, D] -> :class:`~audiomoe.core.decoding.DecoderState`.

        ``attention_mask`` [B, past + L] (1 = real token) covers the cached positions and the new
        ones; ``position_ids`` [B, L] count real tokens; ``cache`` is the previous state's cache.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot decode an interleaved sequence (supports_decoding = False)")

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Text token ids [..] -> input embeddings [.., D] (backbones with a vocabulary)."""
        raise NotImplementedError(f"{type(self).__name__} has no text vocabulary; text heads need a causal_lm backbone")

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [.., D] -> next-token logits [.., V] (the LM head of a backbone with a vocabulary)."""
        raise NotImplementedError(f"{type(self).__name__} has no text vocabulary; text heads need a causal_lm backbone")
