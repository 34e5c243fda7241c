"""``audiomoe predict CHECKPOINT AUDIO...``: what a trained model says about audio files, head by head.

Each file is decoded and resampled as the loader does, then run through every head (or ``--task``)
with an optional ``--prompt`` (the question to answer, the text to speak). Classification heads
give label names, text and CTC heads text, codec heads codes ``[K, T]`` saved as ``.npy`` and, with
a fitted codec, decoded to a ``.wav`` you can listen to. The codec defaults to the one the built-in
corpus's codes for the head's layout were made with (``codes-k<K>-v<V>/codec/``), or the head's own
``codec`` param (e.g. ``dac``), so a model trained on ``builtin`` speaks without flags; the WAVs get a
listening page, ``index.html`` beside them. A file longer than ``--max-seconds`` (30 s) is cropped to one window
for clip-level heads (read alone from disk) and refused up front for the others, naming the flag.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.train.longaudio import DEFAULT_MAX_SECONDS, check_max_seconds, refuse_long_clips


def load_codec(path: str | Path) -> Any:
    """A fitted codec from a ``codec/`` folder (``<name>.json`` params + ``<name>.safetensors`` state) or its parent."""
    from safetensors.torch import load_file

    from audiomoe.core.composer import component_builder

    root = Path(path)
    root = root / "codec" if (root / "codec").is_dir() else root
    params = sorted(root.glob("*.json")) if root.is_dir() else []
    if not params or not params[0].with_suffix(".safetensors").is_file():
        raise AudioMoEError(
            f"no fitted codec in '{path}': expected <name>.json and <name>.safetensors (written by audiomoe.data.encode_manifest)"
        )
    codec = component_builder("codec", {"name": params[0].stem, "params": json.loads(params[0].read_text())})()
    codec.load_state_dict(load_file(str(params[0].with_suffix(".safetensors"))))
    return codec


def corpus_codec(head: Any) -> Optional[Path]:
    """The codec folder of the built-in corpus's codes for ``head``'s codebook layout, if they were made."""
    from audiomoe.data.corpus.make import VERSION, default_cache_dir

    p = getattr(head, "params", None)
    k, size = getattr(p, "num_codebooks", None), getattr(p, "codebook_size", None)
    if k is None or not isinstance(size, int):
        return None
    found = sorted(default_cache_dir().glob(f"corpus-v{VERSION}-*/codes-k{k}-v{size}/codec"))
    return found[0] if found else None


def _waveform(path: str, sample_rate: int, max_seconds: Optional[float] = None) -> torch.Tensor:
    """The file at ``sample_rate``; with ``max_seconds``, a window of that length (seed 0), only it read from disk."""
    from audiomoe.data.loader import ItemDataset
    from audiomoe.data.manifest import Item

    return ItemDataset(
        [Item(audio=str(Path(path).resolve()), task="predict", origin=path)], sample_rate, max_clip_seconds=max_seconds
    ).load(0, 0)


def _shown(head: Any, pred: Any) -> Any:
    """A prediction as JSON-able text: label names where the head has them."""
    if hasattr(head, "decode") and isinstance(pred, torch.Tensor) and pred.dim() <= 2 and not pred.is_floating_point():
        return head.decode(pred)[0]
    if isinstance(pred, torch.Tensor):
        return pred.tolist()
    return pred[0] if isinstance(pred, list) else pred


#: what a folder given to predict is searched for (soundfile reads these)
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def _files(audio: Sequence[str]) -> list[str]:
    """The audio paths, a folder expanded to the audio files under it (sorted)."""
    out = []
    for path in audio:
        if os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                raise AudioMoEError(f"folder '{path}' holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
            out += found
        else:
            out.append(path)
    return out


def predict_files(
    checkpoint: str,
    audio: Sequence[str],
    *,
    tasks: Optional[Sequence[str]] = None,
    prompt: Optional[str] = None,
    codec: Optional[str] = None,
    out_dir: Optional[str] = None,
    device: str = "auto",
    max_seconds: float = DEFAULT_MAX_SECONDS,
) -> list[dict[str, Any]]:
    """One row per (file, task): ``{"audio", "task", "prediction"}`` (+ ``codes`` / ``wav`` paths for codec heads).

    A file longer than ``max_seconds`` is cropped to a window of that length for clip-level heads and
    refused, before any work, for the others (:mod:`audiomoe.train.longaudio`).
    """
    from audiomoe.core.batch import AudioBatch
    from audiomoe.data.manifest import audio_info
    from audiomoe.train.checkpoint import load_checkpoint, resolve_checkpoint
    from audiomoe.train.distributed import pick_device

    max_seconds = check_max_seconds(max_seconds)
    ckpt = resolve_checkpoint(checkpoint)
    model = load_checkpoint(str(ckpt)).to(pick_device(device)).eval()
    chosen = list(tasks or model.task_names)
    unknown = [t for t in chosen if t not in model.task_names]
    if unknown:
        raise AudioMoEError(f"task(s) {unknown} are not heads of this model; it has {', '.join(model.task_names)}")
    files = _files(audio)
    seconds = {path: audio_info(path, "predict") for path in files}  # headers only: long files are refused up front
    clips = [(f"audio file '{p}'", t, s) for p, s in seconds.items() for t in chosen]
    refuse_long_clips(model, clips, max_seconds, "predict")
    out = Path(out_dir) if out_dir else ckpt.parent / "predictions"
    sr = int(model.encoder.sample_rate)
    codecs: dict[Any, Any] = {}
    rows = []
    for path in files:
        crop = seconds[path] > max_seconds  # then every chosen head is clip-level (the others were refused)
        wav = _waveform(path, sr, max_seconds if crop else None)
        for task in chosen:
            batch = AudioBatch(
                wav[None].to(model.device),
                sr,
                [task],
                torch.tensor([wav.shape[0]], device=model.device),
                None,
                [prompt],
            )
            with torch.no_grad():
                pred = model(batch).predictions[task]
            head = model.heads[task]
            row: dict[str, Any] = {"audio": path, "task": task}
            if crop:
                row["window_seconds"] = max_seconds  # a clip-level label, from one window of the long file
            if (
                isinstance(pred, list) and pred and isinstance(pred[0], torch.Tensor) and pred[0].dim() == 2
            ):  # codec codes [K, T]
                row.update(_write_codes(pred[0], head, task, Path(path).stem, out, codec, codecs), prompt=prompt)
            else:
                row["prediction"] = _shown(head, pred)
            rows.append(row)
    from audiomoe.train.codec_audio import write_listening_page

    write_listening_page(rows, out)  # index.html beside the WAVs, when a codec head wrote any
    return rows


def _write_codes(
    codes: torch.Tensor, head: Any, task: str, stem: str, out: Path, codec: Optional[str], cache: dict[Any, Any]
) -> dict[str, Any]:
    """Save codes (and, with a codec, their audio); return the row's fields."""
    import soundfile as sf

    out.mkdir(parents=True, exist_ok=True)
    npy = out / f"{stem}.{task}.npy"
    np.save(npy, codes.cpu().numpy())
    row: dict[str, Any] = {"prediction": f"{codes.shape[0]} x {codes.shape[1]} codes", "codes": str(npy)}
    from audiomoe.train.codec_audio import head_codec

    c = None
    if codec is None:  # the head's own codec (its ``codec`` param), built once per head
        if id(head) not in cache:
            cache[id(head)] = head_codec(head, task)
        c = cache[id(head)]
    where = f"{head.params.codec.name} (head '{task}')" if c is not None else (codec or corpus_codec(head))
    if where is None:
        row["wav"] = None  # no fitted codec known for this layout: pass --codec DIR
        return row
    if c is None:
        if str(where) not in cache:
            cache[str(where)] = load_codec(where)
        c = cache[str(where)]
    if (c.num_codebooks, c.codebook_size) != (codes.shape[0], head.params.codebook_size):
        raise AudioMoEError(
            f"codec '{where}' writes {c.num_codebooks} x {c.codebook_size} codes, head '{task}' {codes.shape[0]} x {head.params.codebook_size}"
        )
    wav = c.decode(codes[None].cpu())[0].numpy() if codes.shape[1] else np.zeros(0, np.float32)
    path = out / f"{stem}.{task}.wav"
    sf.write(str(path), wav.astype(np.float32), c.sample_rate)
    row["wav"] = str(path)
    return row
