"""Generated audio of codec heads: the head's codec, WAV files with a listening page, and the mel distance.

A codec head writes codes; its ``codec`` param (a codec spec, e.g. ``dac`` on local weights) is what
they mean. :func:`head_codec` builds it and checks the head's layout follows it. ``predict`` decodes
the codes to WAV files and writes ``index.html`` beside them (:func:`write_listening_page`), one
``<audio controls>`` per item with its task and prompt. ``eval`` scores generated audio against the
reference clip with :func:`mel_distance`: the mean L1 distance between log-mel spectrograms,
``mean |log(M(x) + eps) - log(M(y) + eps)|`` over the frames both cover (the codec resynthesis
distance of the codec literature, e.g. DAC's mel loss, Kumar et al. 2023, arXiv 2306.06546).
"""

from __future__ import annotations

from typing import Any

from audiomoe.core.errors import AudioMoEError

#: codec tasks whose prompt is the text spoken: their generated audio is transcribed and scored by WER
SPEECH_TASKS = ("tts",)


def head_codec(head: Any, task: str) -> Any:
    """The codec ``head``'s ``codec`` param names, built (None: no such param, or ``mel_rvq`` fitted per layout).

    Its codebooks must be the head's: ``num_codebooks`` and ``codebook_size`` follow the codec, else
    an error naming both layouts and the overrides that fix the head.
    """
    from audiomoe.core.composer import component_builder

    spec = getattr(getattr(head, "params", None), "codec", None)
    if spec is None or spec.name == "mel_rvq":
        return None
    codec = component_builder("codec", spec.model_dump())()
    p = head.params
    size = p.codebook_size if isinstance(p.codebook_size, int) else sorted(set(p.codebook_size))
    if (p.num_codebooks, size) != (codec.num_codebooks, codec.codebook_size):
        k, v = codec.num_codebooks, codec.codebook_size
        raise AudioMoEError(
            f"head '{task}' writes {p.num_codebooks} codebooks x {size} codes but its codec '{spec.name}' has "
            f"{k} x {v}; follow the codec: --set tasks.{task}.num_codebooks={k} --set tasks.{task}.codebook_size={v} "
            f"(and {k} delays), or pick the codec's num_quantizers"
        )
    return codec


def write_listening_page(rows: list[dict[str, Any]], out: Any, prompt: Any = None) -> Any:
    """Write ``index.html`` in ``out`` (atomically): an ``<audio controls>`` per row with a WAV, its task and prompt.

    Plain HTML, no scripts or external assets, so it opens from disk anywhere; WAVs are linked by
    their path relative to ``out``. Returns the page's path, or None when no row has a WAV.
    """
    import html
    import os
    from pathlib import Path

    from audiomoe.core.atomic import write_text

    out = Path(out)
    listened = [r for r in rows if r.get("wav")]
    if not listened:
        return None
    items = []
    for r in listened:
        src = os.path.relpath(r["wav"], out).replace(os.sep, "/")
        said = html.escape(str(r.get("prompt", prompt) or "(no prompt)"))
        items.append(
            f'<tr><td><audio controls preload="metadata" src="{html.escape(src, quote=True)}"></audio></td>'
            f"<td>{html.escape(str(r['task']))}</td><td>{said}</td>"
            f"<td>{html.escape(Path(str(r['audio'])).name)}</td><td>{html.escape(str(r['prediction']))}</td></tr>"
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>audiomoe: generated audio</title>\n'
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.4em .8em;text-align:left}</style></head><body>\n"
        f"<h1>Generated audio ({len(listened)} clip{'s' if len(listened) != 1 else ''})</h1>\n"
        "<table><tr><th>listen</th><th>task</th><th>prompt</th><th>input audio</th><th>codes</th></tr>\n"
        + "\n".join(items)
        + "\n</table></body></html>\n"
    )
    return write_text(out / "index.html", page, what="listening page")


def task_codec(head: Any, task: str) -> Any:
    """The codec that decodes ``head``'s codes: its ``codec`` param's, else the built-in corpus's for its layout, else None."""
    from audiomoe.train.predict import corpus_codec, load_codec

    own = head_codec(head, task)
    if own is not None:
        return own
    found = corpus_codec(head)
    return load_codec(found) if found is not None else None


def mel_distance(generated: Any, reference: Any, sample_rate: int, n_mels: int = 80) -> float:
    """Mean L1 distance between the log-mel spectrograms of two mono clips [T] at ``sample_rate``, over the shorter.

    An empty ``generated`` clip is scored as silence over the reference's length (no output is no
    better than silence). 1024-point FFT, hop 256, ``log(mel + 1e-5)`` as DAC's mel loss.
    """
    import torch
    import torchaudio

    g, r = torch.as_tensor(generated, dtype=torch.float32).reshape(-1), torch.as_tensor(reference).reshape(-1)
    if r.numel() == 0:
        raise AudioMoEError("mel distance: the reference clip is empty")
    n = min(g.numel(), r.numel()) or r.numel()
    g = torch.nn.functional.pad(g[:n], (0, n - g[:n].numel()))
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=int(sample_rate), n_fft=1024, hop_length=256, n_mels=n_mels, pad_mode="constant"
    )
    both = torch.log(mel(torch.stack([g, r[:n].float()])) + 1e-5)
    return float((both[0] - both[1]).abs().mean())


def transcribe(asr_model: Any, clips: list[Any], sample_rate: int, task: str = "asr") -> list[str]:
    """Texts of mono clips [T] at ``sample_rate`` by ``asr_model``'s ``task`` head (text or CTC), one clip at a time."""
    import torch

    from audiomoe.core.batch import AudioBatch
    from audiomoe.core.resample import resample_batch

    if task not in asr_model.task_names:
        raise AudioMoEError(
            f"the ASR model has no '{task}' head (it has {', '.join(asr_model.task_names)}); give a run "
            "trained with an 'asr' head (text or ctc_asr), e.g. `audiomoe train tiny-ctc`"
        )
    head, sr, out = asr_model.heads[task], int(asr_model.encoder.sample_rate), []
    for clip in clips:
        x = torch.as_tensor(clip, dtype=torch.float32).reshape(1, -1)
        n = torch.tensor([x.shape[1]])
        if sample_rate != sr:
            x, n = resample_batch(x, n, int(sample_rate), sr)
        if int(n[0]) == 0:
            out.append("")
            continue
        with torch.no_grad():
            pred = asr_model(AudioBatch(x.to(asr_model.device), sr, [task], n.to(asr_model.device))).predictions[task]
        text = head.decode(pred)[0] if isinstance(pred, torch.Tensor) else pred[0]
        out.append(str(text))
    return out


def codec_scores(
    model: Any, triples: dict[str, list[tuple[Any, Any, Any]]], asr_model: Any = None
) -> dict[str, dict[str, Any]]:
    """``{task: {"mel_distance": mean, "interval": [lo, hi], "items": n}}`` for the codec tasks of ``triples``.

    ``triples[task]`` are ``(prediction, target, item)`` as :func:`audiomoe.train.heldout.predict_items`
    gives them. Each prediction (codes ``[K, T]``) is decoded by the task's codec and compared with the
    reference clip (the item's ``meta["reference_audio"]``, written with its codes; else the target
    codes decoded: the codec's own resynthesis). The interval is the mean's normal 95% interval.
    Tasks without codes or without a codec known for them are left out. With ``asr_model``, tasks whose
    items speak their text prompt (:data:`SPEECH_TASKS`) also get ``asr_wer``: the word error rate (jiwer, normalised text)
    of its transcripts of the generated speech against those prompts, the paper's intelligibility.
    """
    import math
    import os

    import torch

    from audiomoe.data.loader import ItemDataset
    from audiomoe.data.manifest import Item

    out: dict[str, dict[str, Any]] = {}
    for task, rows in triples.items():
        head = model.heads[task]
        codes = [p[0] if isinstance(p, list) else p for p, _, _ in rows]
        if not rows or not all(isinstance(c, torch.Tensor) and c.dim() == 2 for c in codes):
            continue
        codec = task_codec(head, task)
        if codec is None:
            continue
        dists, wavs = [], []
        for c, (_, target, item) in zip(codes, rows):
            wav = codec.decode(c[None].cpu())[0] if c.shape[-1] else torch.zeros(0)
            wavs.append(wav)
            ref_path = (item.meta or {}).get("reference_audio")
            if isinstance(ref_path, str) and os.path.isfile(ref_path):
                ref = ItemDataset([Item(audio=ref_path, task=task, origin=item.origin)], codec.sample_rate).load(0, 0)
            else:
                ref = codec.decode(torch.as_tensor(target)[None].long().cpu())[0]
            dists.append(mel_distance(wav, ref, codec.sample_rate))
        n = len(dists)
        mean = sum(dists) / n
        sd = math.sqrt(sum((d - mean) ** 2 for d in dists) / (n - 1)) if n > 1 else math.nan
        half = 1.959963984540054 * sd / math.sqrt(n)
        out[task] = {"mel_distance": round(mean, 6), "interval": [mean - half, mean + half], "items": n}
        texts = [it.prompt for _, _, it in rows]
        if asr_model is not None and task in SPEECH_TASKS and all(isinstance(t, str) and t.strip() for t in texts):
            import jiwer

            from audiomoe.heads.functional import normalize_text

            heard = transcribe(asr_model, wavs, codec.sample_rate)
            refs, hyps = [normalize_text(t) for t in texts], [normalize_text(h) for h in heard]
            out[task]["asr_wer"] = round(float(jiwer.wer(refs, hyps)), 6)
            out[task]["transcripts"] = heard
    return out
