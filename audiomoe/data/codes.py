"""Codec targets for generation pairs: fit a codec on a manifest's audio, write codes, a generation manifest.

``encode_manifest(manifest, tasks=("tts", "text_to_music"))`` fits the built-in ``mel_rvq`` codec
(k-means on the train split's frames, seconds) unless a fitted codec is given, saves its state
(``codec/<name>.safetensors`` + ``codec/<name>.json`` with its params), writes the codes of every
clip to write (the target ``{"audio": clip}``, else the item's own audio) as ``codes/<clip>.npy``
(int16 [num_codebooks, frames]) and a manifest ``generation.jsonl`` whose targets are
``{"codes": "codes/<clip>.npy"}`` (and ``meta.reference_audio``, the clip's absolute path): what the loader turns into the ``[num_codebooks, frames]``
tensors the ``codec`` and ``codec_generation`` heads take. ``corpus_codes`` does this once per
codebook layout for the built-in corpus, cached beside it; ``codec_codes`` does it once with a
ready codec (``dac``, ``encodec``, ``mimi``: nothing to fit), cached per codec and weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.data.atomic import build_once
from audiomoe.data.manifest import Item, read_manifest, write_manifest


def _waveform(item: Any, sample_rate: int) -> torch.Tensor:
    from audiomoe.data.loader import ItemDataset

    return ItemDataset([item], sample_rate).load(0, 0)


def _written(item: Item) -> Item:
    """The clip an item asks to write: its target ``{"audio": path}`` (whole file), else its own audio."""
    t = item.target
    if isinstance(t, dict) and isinstance(t.get("audio"), str):
        return Item(audio=t["audio"], task=item.task, origin=item.origin, split=item.split)
    return item


def encode_manifest(
    manifest: str | Path,
    tasks: Sequence[str] = ("tts", "text_to_music"),
    codec: Optional[Any] = None,
    params: Optional[dict[str, Any]] = None,
    fit_clips: int = 200,
    out_dir: Optional[str | Path] = None,
) -> Path:
    """Write codes for the clips of ``tasks`` and return the path of ``generation.jsonl`` (in ``out_dir``, default beside ``manifest``)."""
    from safetensors.torch import save_file

    from audiomoe.core.composer import component_builder

    manifest = Path(manifest)
    items, _ = read_manifest(manifest, only_tasks=tasks)
    if not items:
        raise AudioMoEError(f"{manifest}: no items of tasks {list(tasks)} to write codes for")
    if codec is None:
        codec = component_builder("codec", {"name": "mel_rvq", "params": dict(params or {})})()
        train = [_written(it) for it in items if it.split != "test"][:fit_clips]
        if not train:
            raise AudioMoEError(f"{manifest}: no train-split items of tasks {list(tasks)} to fit the codec on")
        codec.fit([_waveform(it, codec.sample_rate) for it in train])
    root = Path(out_dir) if out_dir is not None else manifest.parent
    root.mkdir(parents=True, exist_ok=True)
    (root / "codes").mkdir(exist_ok=True)
    (root / "codec").mkdir(exist_ok=True)
    name = getattr(getattr(codec, "audiomoe_component", None), "name", type(codec).__name__.lower())
    save_file({k: v.contiguous() for k, v in codec.state_dict().items()}, str(root / "codec" / f"{name}.safetensors"))
    (root / "codec" / f"{name}.json").write_text(json.dumps(codec.params.model_dump(), indent=2, sort_keys=True))
    done: dict[str, str] = {}
    for it in items:
        clip = _written(it)
        if clip.audio not in done:
            codes, _ = codec.encode(_waveform(clip, codec.sample_rate)[None])
            rel = f"codes/{Path(clip.audio).stem}.npy"
            np.save(root / rel, codes[0].numpy().astype(np.int16 if codec.codebook_size <= 32768 else np.int32))
            done[clip.audio] = rel
        if clip is not it:  # the clip written is the target's: eval compares generated audio with it
            it.meta = {**(it.meta or {}), "reference_audio": str(Path(clip.audio).resolve())}
        it.target = {"codes": str(root / done[clip.audio])}
    out = root / "generation.jsonl"
    write_manifest(items, out)
    return out


def corpus_codes(
    manifest: str | Path, num_codebooks: int, codebook_size: int, tasks: Sequence[str] = ("tts", "text_to_music")
) -> Path:
    """The generation manifest of a corpus for one codebook layout, made once beside it (atomically).

    ``<corpus>/codes-k<K>-v<V>/generation.jsonl``: ``mel_rvq`` with ``num_codebooks`` stages of
    ``codebook_size`` codes, fitted on the corpus's train clips of ``tasks``.
    """
    manifest = Path(manifest)
    params = {"num_codebooks": num_codebooks, "codebook_size": codebook_size}
    final = manifest.parent / f"codes-k{num_codebooks}-v{codebook_size}"
    return (
        build_once(final, "generation.jsonl", lambda tmp: encode_manifest(manifest, tasks, params=params, out_dir=tmp))
        / "generation.jsonl"
    )


def codec_codes(manifest: str | Path, codec: Any, tasks: Sequence[str] = ("tts", "text_to_music")) -> Path:
    """The generation manifest of ``manifest``'s ``tasks`` encoded by a ready ``codec``, made once beside it.

    ``<corpus>/codes-<codec name>-<key>/generation.jsonl``, ``key`` the codec's ``cache_key()`` (a
    hash of its params and weights: another checkpoint or bandwidth gets another folder), else a
    hash of its params. The folder's ``codec/`` holds the codec's params and state, as
    :func:`encode_manifest` writes them, so predict can decode with it.
    """
    import hashlib

    manifest = Path(manifest)
    name = getattr(getattr(codec, "audiomoe_component", None), "name", type(codec).__name__.lower())
    key_of = getattr(codec, "cache_key", None)
    if callable(key_of):
        key = str(key_of())
    else:
        dumped = json.dumps([name, codec.params.model_dump()], sort_keys=True, default=str)
        key = hashlib.sha256(dumped.encode()).hexdigest()[:16]
    final = manifest.parent / f"codes-{name}-{key}"
    return (
        build_once(final, "generation.jsonl", lambda tmp: encode_manifest(manifest, tasks, codec=codec, out_dir=tmp))
        / "generation.jsonl"
    )
