"""CTC speech recognition head (Graves et al., ICML 2006): per-frame label posteriors + CTC loss.

``log p_t = log_softmax(W h_t + b)`` over ``V + 1`` outputs (index 0 is the CTC blank);
``L = -log sum_{alignments a -> y} prod_t p_t(a_t)`` (``torch.nn.functional.ctc_loss``), averaged
over the batch after dividing by target length. Decoding is best-path (greedy) or CTC prefix beam
search (:mod:`audiomoe.heads.functional`). WER and CER come from jiwer.

Vocabulary: characters by default (``alphabet``, space is the word delimiter), or a token
vocabulary (``tokens``, SentencePiece style: ``"▁"`` starts a word); a transcript string is then
split by greedy longest match. Targets, per item: a transcript string. A character or piece that
the vocabulary cannot spell, and an empty transcript, are errors. Predictions: one string per item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Head
from audiomoe.core.specs import Params
from audiomoe.heads.functional import ctc_greedy_decode, ctc_prefix_beam_search, normalize_text

_WORD = "\u2581"  # SentencePiece's word-start marker


@dataclass
class CTCOutput:
    """``log_probs`` [B, N, V+1] (blank at 0) and ``lengths`` [B] valid frames per item."""

    log_probs: torch.Tensor
    lengths: torch.Tensor


@dataclass
class CTCTargets:
    """``labels`` [B, L] (padded with 0), ``lengths`` [B] and the transcripts as given."""

    labels: torch.Tensor
    lengths: torch.Tensor
    texts: list[str]


class CTCASR(Head):
    """Linear CTC head over frames with a character or token vocabulary; greedy or beam decoding."""

    class Params(Params):
        alphabet: str = Field(
            " abcdefghijklmnopqrstuvwxyz'", min_length=1, description="character vocabulary (used when tokens is unset)"
        )
        tokens: Optional[list[str]] = Field(
            None, min_length=1, description="token vocabulary instead of characters ('\u2581' marks a word start)"
        )
        lowercase: bool = Field(True, description="lower-case transcripts before spelling them")
        decoder: Literal["greedy", "beam"] = Field("greedy", description="best-path or prefix beam search decoding")
        beam_size: int = Field(8, ge=1, le=1024, description="prefixes kept per frame by beam search")
        dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the features before the output layer")
        loss_weight: float = Field(1.0, ge=0.0, le=1000.0, description="weight of this head's loss in the total loss")

        @model_validator(mode="after")
        def _distinct(self) -> "CTCASR.Params":
            units = self.tokens if self.tokens is not None else list(self.alphabet)
            if len(set(units)) != len(units):
                raise ValueError("the vocabulary has repeated entries")
            if self.tokens is not None and any(not t for t in self.tokens):
                raise ValueError("tokens must be non-empty strings")
            return self

    def __init__(self, params: Params, *, d_model: int) -> None:
        super().__init__(params)
        p = self.params
        self.loss_weight = p.loss_weight
        self.units: list[str] = list(p.tokens) if p.tokens is not None else list(p.alphabet)
        self._ids = {u: i + 1 for i, u in enumerate(self.units)}
        self._longest = max(len(u) for u in self.units)
        self.drop = nn.Dropout(p.dropout)
        self.head = nn.Linear(d_model, len(self.units) + 1)

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        """Spell ``text`` with the vocabulary (ids start at 1; 0 is the blank)."""
        if self.params.lowercase:
            text = text.lower()
        if not text.strip():
            raise AudioMoEError(f"empty transcript {text!r}: CTC targets need at least one character")
        if self.params.tokens is None:
            bad = sorted({c for c in text if c not in self._ids})
            if bad:
                raise AudioMoEError(
                    f"transcript {text!r} has character(s) {bad} outside the label set (alphabet {self.params.alphabet!r})"
                )
            return [self._ids[c] for c in text]
        s = _WORD + _WORD.join(text.split())
        ids, i = [], 0
        while i < len(s):
            for n in range(min(self._longest, len(s) - i), 0, -1):
                if s[i : i + n] in self._ids:
                    ids.append(self._ids[s[i : i + n]])
                    i += n
                    break
            else:
                raise AudioMoEError(
                    f"transcript {text!r}: no token in the vocabulary spells {s[i:]!r} (outside the label set)"
                )
        return ids

    def decode_ids(self, ids: list[int]) -> str:
        """Ids (without blanks) back to text."""
        text = "".join(self.units[i - 1] for i in ids)
        if self.params.tokens is not None:
            text = text.replace(_WORD, " ")
        return " ".join(text.split())

    # -- Task -----------------------------------------------------------------------------------

    def forward(self, features: torch.Tensor, padding_mask: torch.Tensor) -> CTCOutput:
        """Per-frame log-probabilities over blank + vocabulary."""
        logits = self.head(self.drop(features))
        return CTCOutput(torch.log_softmax(logits.float(), -1), (~padding_mask).sum(1))

    def make_targets(self, raw: list[Any], device: torch.device) -> CTCTargets:
        """Transcripts -> padded label ids; refuses empty transcripts and unknown characters/pieces."""
        seqs = []
        for i, text in enumerate(raw):
            if not isinstance(text, str):
                raise AudioMoEError(f"CTC target of item {i} must be a transcript string, got {type(text).__name__}")
            seqs.append(self.encode_text(text))
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)
        labels = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            labels[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return CTCTargets(labels, lengths, list(raw))

    def example_targets(self, n: int) -> list[str]:
        """``n`` short transcripts this vocabulary can spell."""
        units = [u for u in self.units if u.strip() and u != _WORD] or self.units
        return [units[i % len(units)] + units[(i + 1) % len(units)] for i in range(n)]

    def loss(self, outputs: CTCOutput, targets: CTCTargets) -> torch.Tensor:
        """CTC loss; an utterance too short for its transcript is an error (not a silent zero)."""
        need = targets.lengths + (targets.labels[:, 1:] == targets.labels[:, :-1]).logical_and(
            torch.arange(1, targets.labels.shape[1], device=targets.labels.device)[None] < targets.lengths[:, None]
        ).sum(1)
        short = (need > outputs.lengths).nonzero().flatten().tolist()
        if short:
            i = short[0]
            raise AudioMoEError(
                f"item {i}: transcript {targets.texts[i]!r} needs at least {int(need[i])} frames but the audio has "
                f"{int(outputs.lengths[i])}; use longer audio, a higher frame rate or a token vocabulary"
            )
        return nn.functional.ctc_loss(
            outputs.log_probs.transpose(0, 1),
            targets.labels,
            outputs.lengths,
            targets.lengths,
            blank=0,
            zero_infinity=False,
        )

    def predict(self, outputs: CTCOutput) -> list[str]:
        """Decoded transcripts (greedy or beam search, per ``decoder``)."""
        if self.params.decoder == "greedy":
            seqs = ctc_greedy_decode(outputs.log_probs, outputs.lengths)
        else:
            seqs = [
                ctc_prefix_beam_search(lp[: int(n)], self.params.beam_size)
                for lp, n in zip(outputs.log_probs, outputs.lengths.tolist())
            ]
        return [self.decode_ids(s) for s in seqs]

    def metrics(self, predictions: list[str], targets: CTCTargets) -> Mapping[str, float]:
        """Word and character error rates (jiwer) after lower-casing and stripping punctuation."""
        import jiwer

        refs = [normalize_text(t) for t in targets.texts]
        hyps = [normalize_text(h) for h in predictions]
        return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}
