"""Plain functions for the AudioLLM head: a file-free byte-level tokenizer and soft-prompt assembly.

- :func:`byte_tokenizer`: a ``transformers.PreTrainedTokenizerFast`` built in memory from a
  ``tokenizers`` BPE model with no merges over the 256 byte symbols (GPT-2's byte-to-unicode map),
  plus ``<pad> <s> </s> <unk>``. Any text round-trips; nothing is read from disk or the hub.
- :func:`assemble_soft_prompt`: builds the LM input for a batch where each item is
  ``[bos] prefix-text <audio soft tokens> suffix-text [answer eos]``, LEFT-padded (so generation
  continues every row right after its prompt), with the attention mask, position ids counted over
  real tokens only, and labels (-100 everywhere except the answer and eos).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def byte_tokenizer() -> "transformers.PreTrainedTokenizerFast":  # noqa: F821
    """A byte-level tokenizer that needs no files: 4 specials + 256 byte tokens (260 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@dataclass
class SoftPrompt:
    """A left-padded LM batch: ``inputs_embeds`` [B, L, H], ``attention_mask`` [B, L] (1 = real),
    ``position_ids`` [B, L], ``labels`` [B, L] (-100 = not scored) and ``audio_mask`` [B, L]
    (True where an audio soft token sits)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    audio_mask: torch.Tensor


def assemble_soft_prompt(
    embed: Callable[[torch.Tensor], torch.Tensor],
    prefix_ids: Sequence[Sequence[int]],
    audio: Sequence[torch.Tensor],
    suffix_ids: Sequence[Sequence[int]],
    answer_ids: Optional[Sequence[Sequence[int]]],
    pad_id: int,
) -> SoftPrompt:
    """Place each item's valid audio frames ``audio[i]`` [n_i, H] between its prefix and suffix tokens.

    ``embed`` is the LM's input embedding. Answers (already ending in eos) are appended and become
    the labels; without answers the batch is a generation prompt.
    """
    b = len(audio)
    answers = answer_ids if answer_ids is not None else [[] for _ in range(b)]
    sizes = [(len(p), a.shape[0], len(s), len(t)) for p, a, s, t in zip(prefix_ids, audio, suffix_ids, answers)]
    total = [sum(x) for x in sizes]
    length = max(total)
    device = audio[0].device
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    real = torch.zeros(b, length, dtype=torch.bool)
    is_audio = torch.zeros(b, length, dtype=torch.bool)
    labels = torch.full((b, length), -100, dtype=torch.long)
    for i, (lp, na, ls, la) in enumerate(sizes):
        o = length - total[i]
        real[i, o:] = True
        ids[i, o : o + lp] = torch.tensor(list(prefix_ids[i]), dtype=torch.long)
        is_audio[i, o + lp : o + lp + na] = True
        s0 = o + lp + na
        ids[i, s0 : s0 + ls] = torch.tensor(list(suffix_ids[i]), dtype=torch.long)
        ids[i, s0 + ls :] = labels[i, s0 + ls :] = torch.tensor(list(answers[i]), dtype=torch.long)
    ids, real, is_audio, labels = ids.to(device), real.to(device), is_audio.to(device), labels.to(device)
    text = embed(ids)
    soft = torch.zeros_like(text).masked_scatter(is_audio.unsqueeze(-1), torch.cat(list(audio)).to(text.dtype))
    embeds = torch.where(is_audio.unsqueeze(-1), soft, text)
    positions = (real.long().cumsum(-1) - 1).clamp_min(0)
    return SoftPrompt(embeds, real.long(), positions, labels, is_audio)
