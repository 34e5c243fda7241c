"""Offline speech: eSpeak NG (formant synthesis) through ctypes, from the PyPI package espeakng-loader.

The library is initialised once per process in synchronous mode (``AUDIO_OUTPUT_SYNCHRONOUS``): a
synth callback collects the int16 samples, so ``espeak_Synth`` returns with the whole utterance
(about 400x real time here). Voice = language + variant (``en+f3``); rate (words/min), pitch
(0-100), pitch range (0-100, 0 = monotone) and volume are espeak parameters. The sentence grammars
below are seeded word sequences, one small vocabulary per language.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Optional

import numpy as np

from audiomoe.core.errors import AudioMoEError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8, _SSML = 1, 0x10
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """One eSpeak NG instance per process (the library keeps global state); thread-safe via a lock."""

    _instance: Optional["Espeak"] = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:  # a declared dependency, but say what to install
            raise AudioMoEError(
                "speech synthesis needs the package espeakng-loader: pip install espeakng-loader"
            ) from exc
        self._paths = (espeakng_loader.get_library_path(), espeakng_loader.get_data_path().encode())
        self._chunks: list[np.ndarray] = []
        self._cb = _CALLBACK(self._collect)  # keep a reference: ctypes does not
        self.lib: Optional[ctypes.CDLL] = None
        self._load()

    def _load(self) -> None:
        """(Re)load the library: eSpeak keeps synthesis state in globals that survive Terminate.

        The same utterance comes out a few samples different after another one, so each utterance
        gets a freshly loaded library (dlclose + dlopen: about 0.3 ms) and output depends only on
        its own text and parameters.
        """
        import _ctypes

        if self.lib is not None:
            self.lib.espeak_Terminate()
            _ctypes.dlclose(self.lib._handle)
        self.lib = ctypes.CDLL(self._paths[0])
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self._paths[1], 0)
        if self.sample_rate <= 0:
            raise AudioMoEError(f"espeak_Initialize failed ({self.sample_rate}); is the espeak-ng-data folder intact?")
        self.lib.espeak_SetSynthCallback(self._cb)
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(0))

    @classmethod
    def get(cls) -> "Espeak":
        """The process-wide instance (created on first use)."""
        with cls._lock:
            if cls._instance is None:
                cls._instance = Espeak()
            return cls._instance

    def _collect(self, wav: ctypes.POINTER(ctypes.c_short), n: int, _events: ctypes.c_void_p) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synth(
        self, text: str, voice: str = "en", rate: int = 175, pitch: int = 50, pitch_range: int = 50, volume: int = 100
    ) -> np.ndarray:
        """Speak ``text`` with ``voice``; int16 samples at :attr:`sample_rate` Hz."""
        with self._lock:
            self._load()
            self._chunks = []
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise AudioMoEError(f"espeak has no voice '{voice}'")
            for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range), (_VOLUME, volume)):
                self.lib.espeak_SetParameter(param, int(value), 0)
            data = text.encode("utf-8")
            flags = _CHARS_UTF8 | (_SSML if text.lstrip().startswith("<") else 0)
            err = self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, flags, None, None)
            if err != 0:
                raise AudioMoEError(f"espeak_Synth failed with code {err} on {text!r}")
            out = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            self._chunks = []
        return out


# Small vocabularies: enough variety that no sentence repeats often, few enough that a tiny CTC
# model sees every word many times.
EN_WORDS = {
    "det": "the a my your this that one every".split(),
    "adj": "red green blue small big old new quiet loud happy cold warm dark bright fast slow".split(),
    "noun": "cat dog bird house car tree river phone table window garden teacher child city song door".split(),
    "verb": "sees finds likes moves opens hears paints takes builds wants".split(),
    "prep": "near under behind above beside".split(),
}

LANG_WORDS = {
    "en": "the house is very big and the water was cold today we see a good friend at night".split(),
    "de": "das haus ist sehr groß und das wasser war kalt heute wir sehen einen guten freund in der nacht".split(),
    "fr": "la maison est très grande et l'eau était froide aujourd'hui nous voyons un bon ami la nuit".split(),
    "es": "la casa es muy grande y el agua estaba fría hoy vemos a un buen amigo por la noche".split(),
    "it": "la casa è molto grande e l'acqua era fredda oggi vediamo un buon amico di notte".split(),
    "pt": "a casa é muito grande e a água estava fria hoje vemos um bom amigo à noite".split(),
    "nl": "het huis is heel groot en het water was koud vandaag zien we een goede vriend in de nacht".split(),
    "pl": "dom jest bardzo duży a woda była zimna dzisiaj widzimy dobrego przyjaciela w nocy".split(),
}
LANG_NAMES = {
    "en": "English",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "nl": "Dutch",
    "pl": "Polish",
}
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]


def english_sentence(rng: np.random.Generator) -> str:
    """A random English sentence of 4-8 words from a tiny grammar (the ASR transcripts)."""
    w = {k: list(v) for k, v in EN_WORDS.items()}
    pick = lambda k: w[k][int(rng.integers(len(w[k])))]
    words = [pick("det")] + ([pick("adj")] if rng.random() < 0.6 else []) + [pick("noun"), pick("verb"), pick("det")]
    words += ([pick("adj")] if rng.random() < 0.4 else []) + [pick("noun")]
    if rng.random() < 0.3:
        words += [pick("prep"), "the", pick("noun")]
    return " ".join(words)


def language_sentence(lang: str, rng: np.random.Generator) -> str:
    """4-7 random words of ``lang``'s vocabulary (phonetics, not meaning, identifies the language)."""
    words = LANG_WORDS[lang]
    return " ".join(words[int(i)] for i in rng.integers(len(words), size=int(rng.integers(4, 8))))
