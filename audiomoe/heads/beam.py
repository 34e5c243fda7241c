"""Beam search over the shared decoder's text vocabulary, with its KV cache (the text head's ``num_beams > 1``).

Standard beam search (as transformers' ``num_beams`` with ``early_stopping=True``): every item keeps
``num_beams`` live prefixes ranked by summed log-probability; each step extends all of them, and an
extension ending in eos becomes a finished hypothesis scored ``sum log p / length ** length_penalty``
(length = generated tokens, eos counted); an item stops once it holds ``num_beams`` finished
hypotheses, and at the length limit its live beams are finished as they are. The best hypothesis is
returned. The cache follows the surviving beams through ``Backbone.select_cache`` (repeats allowed).
"""

from __future__ import annotations

from typing import Any

import torch

from audiomoe.core.decoding import positions_from_mask


def beam_search(
    dec: Any,
    eos: int,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    *,
    limit: int,
    beams: int,
    length_penalty: float,
    use_cache: bool = True,
) -> list[list[int]]:
    """Token ids of the best hypothesis per item (eos excluded) for the left-padded prefixes ``embeds`` [B, N, D]."""
    b = embeds.shape[0]
    rows = torch.arange(b, device=embeds.device).repeat_interleave(beams)
    embeds, mask, last = embeds[rows], mask[rows], positions[rows][:, -1:]
    state = dec.decode(embeds, mask, positions[rows])
    scores = torch.full((b, beams), float("-inf"), device=embeds.device)
    scores[:, 0] = 0.0  # the beams start identical: only one may expand
    seqs: list[list[int]] = [[] for _ in range(b * beams)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    for t in range(limit):
        logp = torch.log_softmax(dec.text_logits(state.hidden[:, -1]).float(), -1)
        vocab = logp.shape[-1]
        top, idx = (scores.view(-1, 1) + logp).view(b, beams * vocab).topk(min(2 * beams, beams * vocab), -1)
        keep_rows, keep_tok, keep_score = [], [], []
        for i in range(b):
            picked = []
            for s, j in zip(top[i].tolist(), idx[i].tolist()):
                if len(picked) == beams or len(finished[i]) >= beams or s == float("-inf"):
                    break
                row, tok = i * beams + j // vocab, j % vocab
                if tok == eos:
                    finished[i].append((s / (t + 1) ** length_penalty, seqs[row]))
                else:
                    picked.append((row, tok, s))
            while len(picked) < beams:  # an item that is done (or short of candidates) keeps dead beams in place
                picked.append((i * beams, eos, float("-inf")))
            for row, tok, s in picked:
                keep_rows.append(row)
                keep_tok.append(tok)
                keep_score.append(s)
        if all(len(f) >= beams for f in finished):
            break
        seqs = [seqs[r] + [tk] for r, tk in zip(keep_rows, keep_tok)]
        scores = torch.tensor(keep_score, device=embeds.device).view(b, beams)
        if t == limit - 1:  # the length limit: the live beams are final as they are
            break
        sel = torch.tensor(keep_rows, device=embeds.device)
        new = dec.embed_tokens(torch.tensor(keep_tok, device=embeds.device)[:, None])
        mask = torch.cat([mask[sel], mask.new_ones(b * beams, 1)], 1)
        last = last[sel] + 1
        if use_cache:
            state = dec.decode(new, mask, last, dec.select_cache(state.cache, sel))
        else:  # the whole sequence again: what the cache must reproduce
            embeds = torch.cat([embeds[sel], new], 1)
            state = dec.decode(embeds, mask, positions_from_mask(mask))
    out = []
    for i in range(b):
        hyps = list(finished[i])
        if len(hyps) < beams:  # the length limit: live beams finish as they are
            live = [(float(scores[i, k]), seqs[i * beams + k]) for k in range(beams) if scores[i, k] > float("-inf")]
            hyps += [(s / max(len(q), 1) ** length_penalty, q) for s, q in live]
        out.append(max(hyps, key=lambda h: h[0])[1] if hyps else [])
    return out
