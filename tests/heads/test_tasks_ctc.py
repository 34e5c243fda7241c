"""CTC ASR head: learns a synthetic transcription task; beam search is exact; vocabularies; errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.heads.ctc import CTCASR
from audiomoe.heads.functional import ctc_greedy_decode, ctc_prefix_beam_search


def _synthetic(gen: torch.Generator, alphabet: str, codes: torch.Tensor, b: int = 16):
    """Random words; each character is 3 frames near its code vector, separated by a silent frame."""
    texts, rows = [], []
    for _ in range(b):
        n = int(torch.randint(2, 5, (1,), generator=gen))
        word = "".join(alphabet[int(i)] for i in torch.randint(0, len(alphabet), (n,), generator=gen))
        frames = []
        for ch in word:
            frames += [codes[alphabet.index(ch)]] * 3 + [torch.zeros(codes.shape[1])]
        texts.append(word)
        rows.append(torch.stack(frames))
    n = max(r.shape[0] for r in rows)
    x = torch.zeros(b, n, codes.shape[1])
    pad = torch.ones(b, n, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, : r.shape[0]] = r + 0.3 * torch.randn(r.shape, generator=gen)
        pad[i, : r.shape[0]] = False
    return x, pad, texts


@pytest.mark.parametrize("decoder", ["greedy", "beam"])
def test_ctc_learns_to_transcribe(decoder):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    alphabet = "abcde"
    codes = torch.eye(len(alphabet), 16) * 3
    head = CTCASR(CTCASR.Params(alphabet=alphabet, decoder=decoder, beam_size=4), d_model=16)
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(60):
        x, pad, texts = _synthetic(gen, alphabet, codes)
        loss = head.loss(head(x, pad), head.make_targets(texts, x.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, pad, texts = _synthetic(gen, alphabet, codes)
    m = head.metrics(head.predict(head(x, pad)), head.make_targets(texts, x.device))
    assert m["cer"] < 0.1 and m["wer"] < 0.3  # chance CER is ~0.8


def _label_probs(lp: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Exact probability of every labelling by enumerating all alignments."""
    t, v = lp.shape
    out: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(v), repeat=t):
        lab = tuple(k for k, _ in itertools.groupby(path) if k != 0)
        out[lab] = out.get(lab, 0.0) + math.exp(sum(float(lp[i, c]) for i, c in enumerate(path)))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_prefix_beam_search_finds_the_most_probable_labelling(seed):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(4, 3, generator=g) * 1.5, -1)
    probs = _label_probs(lp)
    best = max(probs, key=probs.get)
    assert tuple(ctc_prefix_beam_search(lp, beam_size=64)) == best
    assert sum(probs.values()) == pytest.approx(1.0)


def test_beam_beats_greedy_where_best_path_is_not_best_labelling():
    # p(blank) = 0.6 on both frames: best path "--" gives "", but "a" has 0.64 in total.
    lp = torch.log(torch.tensor([[0.6, 0.4], [0.6, 0.4]]))
    assert ctc_greedy_decode(lp[None], torch.tensor([2])) == [[]]
    assert ctc_prefix_beam_search(lp, beam_size=4) == [1]


def test_token_vocabulary_spells_and_decodes():
    head = CTCASR(CTCASR.Params(tokens=["\u2581the", "\u2581ca", "t", "s", "\u2581", "a"]), d_model=4)
    ids = head.encode_text("The cats")
    assert [head.units[i - 1] for i in ids] == ["\u2581the", "\u2581ca", "t", "s"]
    assert head.decode_ids(ids) == "the cats"
    with pytest.raises(AudioMoEError, match="no token in the vocabulary spells 'x"):
        head.encode_text("x")


def test_bad_transcripts_are_clear_errors():
    head = CTCASR(CTCASR.Params(), d_model=4)
    cpu = torch.device("cpu")
    with pytest.raises(AudioMoEError, match="empty transcript"):
        head.make_targets(["hello", "  "], cpu)
    with pytest.raises(AudioMoEError, match=r"character\(s\) \['3', '@'\] outside the label set"):
        head.make_targets(["a@3"], cpu)
    with pytest.raises(AudioMoEError, match="must be a transcript string"):
        head.make_targets([5], cpu)
    # "aa" needs 3 frames (a blank between the repeats); 2 valid frames cannot hold it.
    x = torch.randn(1, 4, 4)
    pad = torch.tensor([[False, False, True, True]])
    with pytest.raises(AudioMoEError, match="needs at least 3 frames but the audio has 2"):
        head.loss(head(x, pad), head.make_targets(["aa"], cpu))
    assert torch.isfinite(head.loss(head(x, torch.zeros(1, 4, dtype=torch.bool)), head.make_targets(["aa"], cpu)))


def test_padding_does_not_leak_into_decoding():
    torch.manual_seed(0)
    head = CTCASR(CTCASR.Params(alphabet="ab"), d_model=4)
    x = torch.randn(2, 6, 4)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 3:] = True
    full = head.predict(head(x, pad))
    alone = head.predict(head(x[1:, :3], pad[1:, :3]))
    assert full[1] == alone[0]
