"""Helpers shared by the Hugging Face encoders (not components): weights, layers, freezing.

- :func:`resolve_pretrained`: ``pretrained`` is a local directory in Hugging Face layout or a
  model id looked up ONLY in the local Hugging Face cache (``local_files_only``; no network).
  Anything missing raises :class:`MissingPretrainedError` naming the id/path and how to fix it.
- :func:`load_prefixed_state_dict`: read only the tensors under one key prefix from a checkpoint
  directory (safetensors, sharded or not, or ``pytorch_model.bin``); used to take Whisper's
  encoder out of a full Whisper checkpoint without loading the decoder.
- :class:`LayerSelect`: which hidden states an encoder outputs: ``"last"``, an index into
  ``hidden_states`` (0 = embeddings, negative counts from the end), or ``"weighted"``: a learned
  softmax-weighted sum of all hidden states (SUPERB, Yang et al. 2021: ``sum_l softmax(w)_l h_l``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from audiomoe.core.errors import AudioMoEError, MissingPretrainedError

LayerChoice = Union[str, int]


def resolve_pretrained(pretrained: str, what: str) -> Path:
    """Return the local directory holding ``pretrained`` (a path, or a model id from the local HF cache)."""
    path = Path(os.path.expanduser(pretrained))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingPretrainedError(
                f"{what}: pretrained directory '{path}' has no config.json (expected a Hugging Face save_pretrained layout)"
            )
        return path
    if path.exists():
        raise MissingPretrainedError(
            f"{what}: pretrained '{pretrained}' is a file; give a directory in Hugging Face layout or a model id"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE as cache

    try:
        local = snapshot_download(pretrained, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the hub raises several types (not cached, bad repo id, ...)
        raise MissingPretrainedError(
            f"{what}: pretrained weights '{pretrained}' are missing: not a local directory and not in the local "
            f"Hugging Face cache ({cache}). audiomoe never downloads; fetch them where there is network "
            f"(`huggingface-cli download {pretrained}`) and copy the cache here, or set pretrained to a local "
            f"directory written by save_pretrained. ({type(exc).__name__})"
        ) from None
    return Path(local)


def check_model_type(path: Path, expected: str, what: str) -> None:
    """Refuse a checkpoint whose ``config.json`` names another architecture than ``expected``."""
    found = json.loads((path / "config.json").read_text()).get("model_type")
    if found != expected:
        raise AudioMoEError(
            f"{what}: checkpoint '{path}' is a '{found}' model, not '{expected}'; use the matching encoder"
        )


def _weight_files(path: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            return [path / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise MissingPretrainedError(f"no model.safetensors or pytorch_model.bin in '{path}'")


def load_prefixed_state_dict(path: Path, prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tensors under the first of ``prefixes`` present in the checkpoint, with the prefix removed."""
    from safetensors import safe_open

    files = _weight_files(path)
    keys: dict[str, Path] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as h:
                keys.update({k: f for k in h.keys()})
        else:
            keys.update({k: f for k in torch.load(f, map_location="cpu", weights_only=True)})
    for prefix in prefixes:
        wanted = {k: f for k, f in keys.items() if k.startswith(prefix)}
        if wanted:
            break
    else:
        raise MissingPretrainedError(f"checkpoint in '{path}' has no tensors under {list(prefixes)}")
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(wanted.values())):
        names = [k for k, g in wanted.items() if g == f]
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as h:
                out.update({k[len(prefix) :]: h.get_tensor(k) for k in names})
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            out.update({k[len(prefix) :]: sd[k] for k in names})
    return out


class LayerSelect(nn.Module):
    """Pick or mix hidden states: ``"last"``, an int index, or ``"weighted"`` (learned softmax weights)."""

    def __init__(self, layer: LayerChoice, num_states: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_states = num_states
        if layer == "weighted":
            self.weights = nn.Parameter(torch.zeros(num_states))
        elif isinstance(layer, int):
            if not -num_states <= layer < num_states:
                raise AudioMoEError(
                    f"layer={layer} is out of range: this encoder has {num_states} hidden states (0..{num_states - 1}, or negative from the end)"
                )
        elif layer != "last":
            raise AudioMoEError(f"layer must be 'last', 'weighted' or an int index, got {layer!r}")

    @property
    def needs_all(self) -> bool:
        """Whether every hidden state must be kept (otherwise only the last one)."""
        return self.layer != "last"

    def forward(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """Combine ``states`` (embeddings first, last layer last) into one [B, N, D] tensor."""
        if self.layer == "last":
            return states[-1]
        if isinstance(self.layer, int):
            return states[self.layer]
        w = self.weights.softmax(0).to(states[0].dtype)
        return torch.einsum("l,lbnd->bnd", w, torch.stack(list(states)))


def freeze_(module: nn.Module) -> None:
    """Stop gradients to every parameter of ``module`` (it is also kept in eval mode by its owner)."""
    for p in module.parameters():
        p.requires_grad_(False)
