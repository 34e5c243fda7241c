"""Plain functions for the AudioLLM head: a file-free byte-level tokenizer and soft-prompt assembly.

- :func:`byte_tokenizer`: a ``transformers.PreTrainedTokenizerFast`` built in memory from a
  ``tokenizers`` BPE model with no merges over the 256 byte symbols (GPT-2's byte-to-unicode map),
  plus ``<pad> <s> </s> <unk>``. Any text round-trips; nothing is read from disk or the hub.
- :func:`assemble_soft_prompt`: builds the LM input for a batch where each item is
  ``[bos] prefix-text <audio soft tokens> suffix-text [answer eos]``, LEFT-padded (so generation
  continues every row right after its prompt), with the attention mask, position ids counted over
  real tokens only, and labels (-100 everywhere except the answer and eos).
- :func:`load_lm`, :func:`lm_and_tokenizer`, :func:`apply_lora`, :class:`LoRAParams`, :func:`check_one_source`: how the
  AudioLLM head and the ``causal_lm`` backbone get a transformers causal LM (local directory or
  random config) and its LoRA adapters, written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch
from pydantic import Field

from audiomoe.core.errors import AudioMoEError, MissingPretrainedError
from audiomoe.core.specs import Params

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
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
    for i, (lp, na, ls, _la) in enumerate(sizes):
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


class LoRAParams(Params):
    """LoRA settings (peft ``LoraConfig``)."""

    r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(16.0, gt=0.0, le=4096.0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, description="LM module names LoRA wraps"
    )


def check_one_source(pretrained: Optional[str], config: Optional[Mapping[str, Any]]) -> None:
    """A params validator's rule: an LM comes from a local directory or a random config, not both."""
    if pretrained is not None and config is not None:
        raise ValueError("give either 'pretrained' (a local LM directory) or 'config' (a random LM), not both")


def load_lm(
    pretrained: Optional[str], config: Mapping[str, Any], dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """A causal LM from a local directory (only local files are read) or from ``config`` (needs ``model_type``).

    ``overrides`` (e.g. the tokenizer's ids) are added to a random config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if pretrained is not None:
        path = Path(pretrained).expanduser()
        if not path.is_dir():
            raise MissingPretrainedError(
                f"pretrained LM directory '{pretrained}' does not exist (only local paths are read: download it and give its path)"
            )
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    raw = dict(config)
    model_type = raw.pop("model_type", None)
    if not model_type:
        raise AudioMoEError("config needs 'model_type' (e.g. llama, qwen2, gemma)")
    try:
        cfg = AutoConfig.for_model(model_type, **{**raw, **overrides})
    except (ValueError, TypeError) as exc:
        raise AudioMoEError(f"cannot build an LM config of type '{model_type}' from {raw}: {exc}") from exc
    return AutoModelForCausalLM.from_config(cfg).to(dtype)


def lm_and_tokenizer(
    pretrained: Optional[str],
    config: Optional[Mapping[str, Any]],
    default: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    tokenizer: Optional[str] = None,
) -> tuple[torch.nn.Module, Any]:
    """An LM and its tokenizer: both from a local directory, or a random ``config`` (else ``default``) with the byte tokenizer.

    A random LM gets the byte tokenizer's vocabulary size and special ids, so any text round-trips.
    A directory without tokenizer files gives ``None`` (the LM can still read audio; text heads refuse it).
    """
    from transformers import AutoTokenizer

    if pretrained is not None:
        lm = load_lm(pretrained, {}, dtype)  # names a missing directory first
        path = Path(pretrained).expanduser()
        if not any(
            (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        ):
            return lm, None
        return lm, AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer is None:
        tok = byte_tokenizer()
        ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        return load_lm(None, config or default, dtype, **ids, eos_token_id=tok.eos_token_id), tok
    # a random-shaped LM whose weights come later (an imported release): its own tokenizer, and a vocabulary
    # as large as the config says (a release may keep more embedding rows than its tokenizer has ids)
    path = Path(tokenizer).expanduser()
    if not path.is_dir():
        raise MissingPretrainedError(f"tokenizer directory '{tokenizer}' does not exist (only local paths are read)")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    cfg = dict(config or default)
    vocab = max(int(cfg.pop("vocab_size", 0)), len(tok))
    return load_lm(None, cfg, dtype, vocab_size=vocab, pad_token_id=tok.pad_token_id), tok


def apply_lora(lm: torch.nn.Module, lora: LoRAParams) -> torch.nn.Module:
    """Wrap ``lm`` with peft LoRA adapters on ``lora.targets`` (named if missing); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in lm.named_modules()}
    missing = [t for t in lora.targets if t not in names]
    if missing:
        raise AudioMoEError(
            f"LoRA targets {missing} are not modules of this LM; candidates include {sorted(names)[:20]}"
        )
    return get_peft_model(
        lm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.targets))
    )
