"""The built-in offline corpus: speech (eSpeak NG), sound events, music, mixtures, QA and generation pairs.

``make_corpus(DIR, size="small", seed=0)`` writes ``wav/`` files, one ``manifest.jsonl`` (every
line names its ``task`` and ``split``) and ``corpus.json`` (the tasks, their heads and labels,
counts and seconds). Every clip is a pure function of ``(seed, kind, index)`` and files are 16-bit
PCM WAV, so the same seed gives the same bytes with any number of worker processes.

Tasks (classification unless noted): ``asr`` (CTC transcripts), ``language`` (8 languages),
``speaker`` (10 synthetic speakers: voice variant, pitch, range, rate), ``style`` (neutral,
question, excited, calm, monotone: pitch, rate, range and punctuation contours), ``event`` (10
classes), ``instrument``, ``tempo``, ``mode`` (music), ``mix_background`` (what is behind speech:
an event class or music, at -5..10 dB speech-to-background), ``qa`` and ``caption`` (AudioLLM
pairs from the metadata), ``tts`` (voice-prompted speech generation, as UniMoE-Audio's voice
cloning: the input audio is another clip of the same synthetic speaker, the prompt the text, the
target ``{"audio": clip}`` the speech to write) and ``text_to_music`` (the caption says what to
play, another clip of the same instrument is the input); codec codes for both come from
:func:`audiomoe.data.codes.corpus_codes`.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.resample import resample_audio
from audiomoe.data.atomic import build_once
from audiomoe.data.corpus import sounds
from audiomoe.data.corpus.speech import LANG_NAMES, VARIANTS, Espeak, english_sentence, language_sentence

VERSION = 8  # bump when the generator's output changes: cached corpora are keyed by it
STYLES = ["neutral", "question", "excited", "calm", "monotone"]
SPEAKERS = 10
SPEAKER_VARIANTS = ["m1", "f2", "m3", "f4", "m5"]
# Clips per kind for "small" (about one hour); "medium" is ten times as many.
COUNTS = {"asr": 360, "language": 288, "speaker": 280, "style": 220, "event": 280, "music": 200, "mix": 132}
SIZES = {"small": 1, "medium": 10, "tiny": 0.05}
#: Clips per kind made for the test split alone, beyond the ~20% of COUNTS that fall in it: a task's
#: test accuracy is then known to about +-0.03 (200 items: a standard error of at most 0.035), where
#: the ~55 test items of the 20% alone left +-0.07 and could not rank two models.
TEST_EXTRA = {"small": 150, "medium": 150, "tiny": 0}
#: The understanding tasks a corpus holds (names of corpus.json's classification and ASR tasks): a
#: model whose heads all carry these names trains on the corpus by default (``audiomoe train``).
UNDERSTANDING_TASKS = ("asr", "language", "speaker", "style", "event", "instrument", "tempo", "mode", "mix_background")
#: Text-answer tasks (``text`` / ``audiollm`` heads; ``asr`` is also one) and codec-code tasks
#: (``codec`` / ``codec_generation`` heads: codes made for the head's codebook layout by
#: :func:`audiomoe.data.codes.corpus_codes`). Every corpus task trains by default.
TEXT_TASKS = ("qa", "caption")
CODE_TASKS = ("tts", "text_to_music")
CORPUS_TASKS = UNDERSTANDING_TASKS + TEXT_TASKS + CODE_TASKS
KIND_IDS = {k: i for i, k in enumerate(COUNTS)}
BACKGROUNDS = sounds.EVENTS + ["music"]
# Four keys, not twelve: with every key, major vs minor is a relative-interval judgement that a tiny
# model does not learn from ~160 clips in 300 steps (measured: chance); with four it is learnable.
MUSIC_KEYS = ["C", "D", "F", "A"]


def _speaker(seed: int, spk: int) -> dict[str, Any]:
    # Speakers come in pairs sharing a voice variant, range and rate; the second speaks 6 pitch
    # steps higher, within reach of the per-utterance jitter (+-4): with a variant each, a tiny
    # model reached 100% in 300 steps.
    rng = np.random.default_rng([seed, 99, spk // 2])
    v = {
        "variant": SPEAKER_VARIANTS[(spk // 2) % len(SPEAKER_VARIANTS)],
        "pitch": int(rng.integers(30, 60)),
        "range": int(rng.integers(20, 80)),
        "rate": int(rng.integers(140, 200)),
    }
    v["pitch"] += 6 * (spk % 2)
    return v


def _voice(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "variant": VARIANTS[int(rng.integers(len(VARIANTS)))],
        "pitch": int(rng.integers(25, 75)),
        "range": int(rng.integers(20, 80)),
        "rate": int(rng.integers(140, 200)),
    }


def _say(
    text: str, lang: str, v: dict[str, Any], rng: np.random.Generator, jitter: bool = True
) -> tuple[np.ndarray, int]:
    es = Espeak.get()
    j = (lambda a: int(rng.integers(-a, a + 1))) if jitter else (lambda a: 0)
    x = es.synth(
        text,
        f"{lang}+{v['variant']}",
        rate=v["rate"] + j(10),
        pitch=v["pitch"] + j(4),
        pitch_range=max(v["range"] + j(8), 0),
    )
    return x.astype(np.float64) / 32768.0, es.sample_rate


def _level(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # A random peak level: loudness must not give away a class.
    return x / (np.abs(x).max() + 1e-9) * 10 ** (-float(rng.uniform(1, 12)) / 20)


def _clip(kind: str, i: int, seed: int) -> tuple[np.ndarray, int, list[dict[str, Any]], dict[str, Any]]:
    """One clip: (samples, rate, manifest lines without audio/split, metadata)."""
    rng = np.random.default_rng([seed, KIND_IDS[kind], i])
    lines: list[dict[str, Any]] = []
    qa = lambda q, a: lines.append({"task": "qa", "prompt": {"mode": "qa", "question": q}, "target": a})
    if kind == "asr":
        text = english_sentence(rng)
        x, sr = _say(text, "en", _voice(rng), rng)
        lines.append({"task": "asr", "target": text})
        meta = {"text": text}
    elif kind == "language":
        lang = sorted(LANG_NAMES)[i % len(LANG_NAMES)]
        x, sr = _say(language_sentence(lang, rng), lang, _voice(rng), rng)
        lines.append({"task": "language", "target": LANG_NAMES[lang]})
        qa("Which language is spoken?", LANG_NAMES[lang])
        meta = {"language": lang}
    elif kind == "speaker":
        spk = i % SPEAKERS
        text = english_sentence(rng)
        x, sr = _say(text, "en", _speaker(seed, spk), rng)
        lines += [{"task": "speaker", "target": f"spk{spk:02d}"}, {"task": "tts", "prompt": text}]
        meta = {"speaker": spk, "text": text}
    elif kind == "style":
        style = STYLES[i % len(STYLES)]
        v = _voice(rng)
        text = english_sentence(rng)
        if style == "question":
            text = "is it true that " + text + "?"
        elif style == "excited":
            v.update(rate=v["rate"] + 40, pitch=min(v["pitch"] + 15, 99), range=min(v["range"] + 30, 100))
            text += "!"
        elif style == "calm":
            v.update(rate=v["rate"] - 40, pitch=max(v["pitch"] - 12, 0), range=max(v["range"] - 15, 5))
        elif style == "monotone":
            v.update(range=0)
        x, sr = _say(text, "en", v, rng)
        lines.append({"task": "style", "target": style})
        qa("What is the speaking style?", style)
        meta = {"style": style}
    elif kind == "event":
        name = sounds.EVENTS[i % len(sounds.EVENTS)]
        x, sr = sounds.event(name, float(rng.uniform(1.0, 2.5)), rng), sounds.SR
        lines += [
            {"task": "event", "target": name},
            {"task": "caption", "prompt": {"mode": "caption"}, "target": sounds.EVENT_CAPTIONS[name]},
        ]
        qa("What sound is this?", name)
        meta = {"event": name}
    elif kind == "music":
        ins = sounds.INSTRUMENTS[i % 4]
        tempo = list(sounds.TEMPI)[(i // 4) % 3]
        mode = ["major", "minor"][(i // 12) % 2]
        key = MUSIC_KEYS[int(rng.integers(len(MUSIC_KEYS)))]
        x, sr = sounds.music(ins, tempo, key, mode, float(rng.uniform(2.5, 4.0)), rng), sounds.SR
        cap = sounds.music_caption(ins, tempo, key, mode)
        lines += [
            {"task": "instrument", "target": ins},
            {"task": "tempo", "target": tempo},
            {"task": "mode", "target": mode},
            {"task": "caption", "prompt": {"mode": "caption"}, "target": cap},
            {"task": "text_to_music", "prompt": cap},
        ]
        qa("What instrument is playing?", ins)
        meta = {"instrument": ins, "tempo": tempo, "key": key, "mode": mode}
    else:  # mix: speech over an event or music
        bg = BACKGROUNDS[i % len(BACKGROUNDS)]
        lang = sorted(LANG_NAMES)[(i // len(BACKGROUNDS)) % len(LANG_NAMES)]
        sp, ssr = _say(language_sentence(lang, rng), lang, _voice(rng), rng)
        sp = resample_audio(sp, ssr, sounds.SR).astype(np.float64)  # the kit's one resampler (imports torch lazily)
        dur = len(sp) / sounds.SR
        if bg == "music":
            back = sounds.music(
                sounds.INSTRUMENTS[int(rng.integers(4))],
                list(sounds.TEMPI)[int(rng.integers(3))],
                sounds.KEYS[int(rng.integers(12))],
                "major",
                dur,
                rng,
            )
        else:
            back = sounds.event(bg, dur, rng)
        back = np.pad(back, (0, max(len(sp) - len(back), 0)))[: len(sp)]  # rounding of seconds -> samples
        snr = float(rng.uniform(-5, 10))
        back = back * np.sqrt(np.mean(sp**2) / (np.mean(back**2) + 1e-12) / 10 ** (snr / 10))
        x, sr = sp + back, sounds.SR
        lines.append({"task": "mix_background", "target": bg})
        qa("What is heard behind the voice?", "music" if bg == "music" else sounds.EVENT_CAPTIONS[bg])
        meta = {"background": bg, "language": lang, "snr_db": round(snr, 2)}
    return _level(x, rng), sr, lines, meta


def _job(args: tuple[str, int, int, str, bool]) -> list[dict[str, Any]]:
    """Make and write one clip; return its manifest lines (audio relative to the corpus root)."""
    import soundfile as sf

    kind, i, seed, root, test_only = args
    split = "test" if test_only or np.random.default_rng([seed, 1000 + KIND_IDS[kind], i]).random() < 0.2 else "train"
    x, sr, lines, meta = _clip(kind, i, seed)
    rel = f"wav/{kind}/{kind}_{i:05d}.wav"
    sf.write(os.path.join(root, rel), np.clip(x, -1, 1).astype(np.float32), sr, subtype="PCM_16", format="WAV")
    out = []
    for line in lines:
        out.append(
            {
                "audio": rel,
                "duration": round(len(x) / sr, 6),
                "split": split,
                "dataset": f"builtin-{kind}",
                "meta": meta,
                **line,
            }
        )
    return out


#: What a generation line's reference clip shares with its target: the voice (tts), the instrument (music)
REFERENCE_KEY = {"tts": "speaker", "text_to_music": "instrument"}


def _voice_prompted(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each generation line the next clip of the same voice / instrument and split as its input audio.

    The line's own clip becomes its target ``{"audio": ...}`` (the text says what to write, the
    reference how it sounds); a clip with no other clip of its group in its split gets no line.
    """
    key = lambda line: (line["task"], line["meta"][REFERENCE_KEY[line["task"]]], line["split"])
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for line in lines:
        if line["task"] in REFERENCE_KEY:
            groups.setdefault(key(line), []).append(line)
    out = []
    for line in lines:
        if line["task"] not in REFERENCE_KEY:
            out.append(line)
            continue
        group = groups[key(line)]
        if len(group) < 2:
            continue
        ref = group[(group.index(line) + 1) % len(group)]
        meta = {**line["meta"], "reference": ref["audio"]}
        out.append(
            {
                **line,
                "audio": ref["audio"],
                "duration": ref["duration"],
                "target": {"audio": line["audio"]},
                "meta": meta,
            }
        )
    return out


def _tasks_info() -> dict[str, Any]:
    cls = lambda labels: {"head": "classification", "labels": labels}
    return {
        "asr": {"head": "ctc_asr"},
        "language": cls([LANG_NAMES[k] for k in sorted(LANG_NAMES)]),
        "speaker": cls([f"spk{i:02d}" for i in range(SPEAKERS)]),
        "style": cls(STYLES),
        "event": cls(sounds.EVENTS),
        "instrument": cls(sounds.INSTRUMENTS),
        "tempo": cls(list(sounds.TEMPI)),
        "mode": cls(["major", "minor"]),
        "mix_background": cls(BACKGROUNDS),
        "qa": {"head": "audiollm"},
        "caption": {"head": "audiollm"},
        "tts": {"head": "codec", "targets": "codes"},
        "text_to_music": {"head": "codec", "targets": "codes"},
    }


def make_corpus(
    out_dir: str | os.PathLike, size: str = "small", seed: int = 0, workers: int = 2, progress: bool = True
) -> Path:
    """Write the built-in corpus into ``out_dir``; return the manifest path (same seed: same bytes)."""
    from tqdm.auto import tqdm

    if size not in SIZES:
        raise AudioMoEError(f"unknown corpus size '{size}'; choose one of {', '.join(SIZES)}")
    root = Path(out_dir)
    for kind in COUNTS:
        (root / "wav" / kind).mkdir(parents=True, exist_ok=True)
    jobs = []
    for k, n in COUNTS.items():
        n_main = max(int(n * SIZES[size]), 11)
        jobs += [(k, i, seed, str(root), False) for i in range(n_main)]
        jobs += [(k, i, seed, str(root), True) for i in range(n_main, n_main + TEST_EXTRA[size])]
    # off a terminal (CI logs, pipes) a carriage-return bar is a flood: tqdm's disable=None turns it off there
    bar = tqdm(
        total=len(jobs), desc=f"corpus {size}", unit="clip", disable=None if progress else True, dynamic_ncols=True
    )
    results: list[list[dict[str, Any]]] = []
    if workers > 1:
        import multiprocessing as mp

        # spawn: a forked child of a process that already runs torch threads can deadlock.
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for r in pool.map(_job, jobs, chunksize=16):
                results.append(r)
                bar.update()
    else:
        for j in jobs:
            results.append(_job(j))
            bar.update()
    bar.close()
    lines = _voice_prompted([line for r in results for line in r])
    with open(root / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
    seconds = sum(r[0]["duration"] for r in results)
    info = {
        "version": VERSION,
        "size": size,
        "seed": seed,
        "clips": len(results),
        "lines": len(lines),
        "hours": round(seconds / 3600, 4),
        "tasks": _tasks_info(),
    }
    (root / "corpus.json").write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
    return root / "manifest.jsonl"


def default_cache_dir() -> Path:
    """``$AUDIOMOE_CACHE`` or ``~/.cache/audiomoe``."""
    return Path(os.environ.get("AUDIOMOE_CACHE") or Path.home() / ".cache" / "audiomoe")


def builtin_corpus(
    cache_dir: Optional[str | os.PathLike] = None, size: str = "small", seed: int = 0, progress: bool = True
) -> Path:
    """The built-in corpus's manifest, made once into ``cache_dir`` (atomically: a crash leaves no half corpus)."""
    final = Path(cache_dir or default_cache_dir()) / f"corpus-v{VERSION}-{size}-seed{seed}"
    return (
        build_once(final, "corpus.json", lambda tmp: make_corpus(tmp, size, seed, progress=progress)) / "manifest.jsonl"
    )
