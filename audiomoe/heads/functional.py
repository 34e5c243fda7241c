"""Plain functions shared by the task heads: pooling, CTC decoding, the codec delay pattern, sampling.

- :func:`masked_mean`: mean over valid frames only.
- :func:`ctc_greedy_decode` / :func:`ctc_prefix_beam_search`: CTC decoding (Graves et al. 2006;
  prefix beam search as in Hannun et al. 2014, without a language model). The beam search sums
  the probabilities of all alignments of a prefix, so with a wide enough beam it returns the most
  probable *labelling*, which best-path (greedy) decoding does not.
- :func:`apply_delay_pattern` / :func:`revert_delay_pattern`: the multi-codebook delay pattern of
  MusicGen and UniMoE-Audio (codebook ``k`` shifted right by ``delays[k]`` steps).
- :func:`sample_logits`: temperature / top-k / top-p sampling through transformers' logits warpers.
- :func:`normalize_text`: the text normalisation used before WER / exact-match scoring.
- :func:`generation`: the decorator of every head's ``generate`` (no grad, eval mode).
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch

from audiomoe.core.decoding import generation_mode


def generation(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a head's ``generate``: no gradients, and eval mode while it runs (mode restored).

    Generation is inference even when called on a model in training mode: router jitter, logit
    noise and dropout must not shape the sampled tokens.
    """

    @functools.wraps(fn)
    def wrapper(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), generation_mode():
                return fn(self, *args, **kwargs)
        finally:
            self.train(was_training)

    return wrapper


# -- pooling ----------------------------------------------------------------------------------


def masked_mean(features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``features`` [B, N, D] over frames where ``padding_mask`` [B, N] is False (zeros if none)."""
    keep = (~padding_mask).unsqueeze(-1).to(features.dtype)
    return (features * keep).sum(1) / keep.sum(1).clamp_min(1.0)


# -- CTC decoding -----------------------------------------------------------------------------


def ctc_greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Best-path decoding: arg-max per frame, merge repeats, drop blanks. ``log_probs`` [B, T, V]."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lengths.tolist()):
        ids = torch.unique_consecutive(row[: int(n)]).tolist()
        out.append([i for i in ids if i != blank])
    return out


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def ctc_prefix_beam_search(log_probs: torch.Tensor, beam_size: int, blank: int = 0) -> list[int]:
    """Most probable labelling of one utterance's ``log_probs`` [T, V] by CTC prefix beam search.

    Each prefix keeps two scores: ending in blank and ending in its last label; extending with the
    same label as the last one only continues a label after a blank. Per frame only the
    ``beam_size`` most likely non-blank labels are tried (exact when ``beam_size >= V - 1`` and the
    beam is wide enough to hold every prefix).
    """
    lp = log_probs.detach().float().cpu()
    t_len, vocab = lp.shape
    n_try = min(vocab - 1, beam_size)
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}
    for t in range(t_len):
        row = lp[t]
        scores = row.clone()
        scores[blank] = -math.inf
        cands = scores.topk(n_try).indices.tolist() if n_try > 0 else []
        row_l = row.tolist()
        nxt: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [-math.inf, -math.inf])
        for prefix, (pb, pnb) in beams.items():
            total = _logaddexp(pb, pnb)
            cell = nxt[prefix]
            cell[0] = _logaddexp(cell[0], total + row_l[blank])
            last = prefix[-1] if prefix else None
            for c in cands:
                p = row_l[c]
                ext = nxt[prefix + (c,)]
                if c == last:
                    cell[1] = _logaddexp(cell[1], pnb + p)  # repeat collapses into the same label
                    ext[1] = _logaddexp(ext[1], pb + p)  # a new label needs a blank in between
                else:
                    ext[1] = _logaddexp(ext[1], total + p)
        ranked = sorted(nxt.items(), key=lambda kv: _logaddexp(*kv[1]), reverse=True)[:beam_size]
        beams = {k: (v[0], v[1]) for k, v in ranked}
    best = max(beams.items(), key=lambda kv: _logaddexp(*kv[1]))
    return list(best[0])


# -- codec delay pattern ----------------------------------------------------------------------


def apply_delay_pattern(
    codes: torch.Tensor, lengths: torch.Tensor, delays: Sequence[int], *, bos: int, eos: int, pad: int
) -> torch.Tensor:
    """Delay codebook ``k`` by ``delays[k]`` steps: codes [B, K, T] -> delayed [B, K, T + max(delays) + 1].

    ``delayed[b, k, t]`` is ``bos`` for ``t < delays[k]``, ``codes[b, k, t - delays[k]]`` while that
    is a valid frame (``< lengths[b]``), ``eos`` at ``t = lengths[b] + delays[k]``, ``pad`` after.
    """
    b, k, t = codes.shape
    d = torch.as_tensor(list(delays), device=codes.device).view(1, k, 1)
    s = t + int(d.max()) + 1
    pos = torch.arange(s, device=codes.device).view(1, 1, s)
    src = pos - d
    n = lengths.to(codes.device).view(b, 1, 1)
    gathered = codes.gather(2, src.clamp(0, max(t - 1, 0)).expand(b, k, s))
    out = torch.where(src < 0, torch.full_like(gathered, bos), gathered)
    out = torch.where(src == n, torch.full_like(out, eos), out)
    return torch.where(src > n, torch.full_like(out, pad), out)


def revert_delay_pattern(
    delayed: torch.Tensor, lengths: torch.Tensor, delays: Sequence[int], *, pad: int
) -> torch.Tensor:
    """Inverse of :func:`apply_delay_pattern`: delayed [B, K, S] -> codes [B, K, max(lengths)] (``pad`` beyond a length)."""
    b, k, s = delayed.shape
    t = int(lengths.max()) if lengths.numel() else 0
    d = torch.as_tensor(list(delays), device=delayed.device).view(1, k, 1)
    pos = torch.arange(t, device=delayed.device).view(1, 1, t)
    src = (pos + d).clamp_max(s - 1).expand(b, k, t)
    out = delayed.gather(2, src)
    valid = pos < lengths.to(delayed.device).view(b, 1, 1)
    return torch.where(valid, out, torch.full_like(out, pad))


# -- sampling ---------------------------------------------------------------------------------


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Sample one id per row of ``logits`` [N, V] (``-inf`` marks forbidden ids); temperature 0 = arg-max."""
    if temperature <= 0:  # max's indices: the same first maximal id as argmax, ~2x faster on CPU (a decoding step's)
        return logits.max(-1).indices
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits.float())
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = torch.softmax(scores, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- text ---------------------------------------------------------------------------------------

_PUNCT = re.compile(r"[^\w\s']")


def normalize_text(text: str) -> str:
    """Lower-case, NFKC, drop punctuation except apostrophes, collapse spaces (for WER and exact match)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", text).split())
