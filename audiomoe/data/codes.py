"""Codec targets for generation pairs: fit a codec on a manifest's audio, write codes, a generation manifest.

``encode_manifest(manifest, tasks=("tts", "text_to_music"))`` fits the built-in ``mel_rvq`` codec
(k-means on the train split's frames, seconds) unless a fitted codec is given, saves its state
(``codec/<name>.safetensors`` + ``codec/<name>.json`` with its params), writes the codes of every
clip of those tasks (``codes/<clip>.npy``, int16 [num_codebooks, frames]) and a manifest
``generation.jsonl`` whose targets are ``{"codes": "codes/<clip>.npy"}``: what the loader turns
into the ``[num_codebooks, frames]`` tensors the ``codec_generation`` head takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..core.errors import AudioMoEError
from .manifest import read_manifest, write_manifest


def _waveform(item: Any, sample_rate: int) -> torch.Tensor:
    from .loader import ItemDataset

    return ItemDataset([item], sample_rate).load(0, 0)


def encode_manifest(
    manifest: str | Path,
    tasks: Sequence[str] = ("tts", "text_to_music"),
    codec: Optional[Any] = None,
    params: Optional[dict[str, Any]] = None,
    fit_clips: int = 200,
) -> Path:
    """Write codes for the clips of ``tasks`` and return the path of ``generation.jsonl`` beside ``manifest``."""
    from safetensors.torch import save_file

    from ..core.composer import component_builder

    manifest = Path(manifest)
    items, _ = read_manifest(manifest, only_tasks=tasks)
    if codec is None:
        codec = component_builder("codec", {"name": "mel_rvq", "params": dict(params or {})})()
        train = [it for it in items if it.split != "test"][:fit_clips]
        if not train:
            raise AudioMoEError(f"{manifest}: no train-split items of tasks {list(tasks)} to fit the codec on")
        codec.fit([_waveform(it, codec.sample_rate) for it in train])
    root = manifest.parent
    (root / "codes").mkdir(exist_ok=True)
    (root / "codec").mkdir(exist_ok=True)
    name = getattr(getattr(codec, "audiomoe_component", None), "name", type(codec).__name__.lower())
    save_file({k: v.contiguous() for k, v in codec.state_dict().items()}, str(root / "codec" / f"{name}.safetensors"))
    (root / "codec" / f"{name}.json").write_text(json.dumps(codec.params.model_dump(), indent=2, sort_keys=True))
    done: dict[str, str] = {}
    for it in items:
        if it.audio not in done:
            codes, _ = codec.encode(_waveform(it, codec.sample_rate)[None])
            rel = f"codes/{Path(it.audio).stem}.npy"
            np.save(root / rel, codes[0].numpy().astype(np.int16 if codec.codebook_size <= 32768 else np.int32))
            done[it.audio] = rel
        it.target = {"codes": done[it.audio]}
    out = root / "generation.jsonl"
    write_manifest(items, out)
    return out
