"""Sound events and music synthesised with numpy, every parameter drawn from a seeded generator.

Events: ten classes with distinct temporal and spectral shapes, several of them deliberately
confusable (knock / footsteps / clap are all impulsive; rain / wind are both noise textures;
siren / beep are both tonal), each with randomised parameters and a noise floor.

Music: a melody (random walk on the scale degrees of a key and mode) over a sustained tonic triad
and a hi-hat on the beat, at a tempo, on one of four timbres: ``organ`` (additive, all harmonics, no decay), ``plucked
string`` (additive harmonics with a decay that grows with the harmonic number: the
Karplus-Strong spectrum), ``clarinet`` (odd harmonics) and ``electric piano`` (two-operator FM
with a decaying index). Captions are made from the same parameters.
"""

from __future__ import annotations

import numpy as np

SR = 16000
EVENTS = ["siren", "knock", "chirp", "engine", "rain", "bell", "beep", "clap", "wind", "footsteps"]
EVENT_CAPTIONS = {
    "siren": "a siren wailing up and down",
    "knock": "someone knocking on a door",
    "chirp": "a bird chirping",
    "engine": "an engine humming",
    "rain": "rain falling",
    "bell": "a bell ringing",
    "beep": "an electronic alarm beeping",
    "clap": "people clapping",
    "wind": "wind blowing",
    "footsteps": "footsteps walking",
}
INSTRUMENTS = ["organ", "plucked string", "clarinet", "electric piano"]
TEMPI = {"slow": (50, 70), "moderate": (95, 115), "fast": (150, 180)}
KEYS = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
MODES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}


def _t(seconds: float) -> np.ndarray:
    return np.arange(int(seconds * SR)) / SR


def _lowpass(x: np.ndarray, cutoff: float) -> np.ndarray:
    """Brick-wall low-pass in the frequency domain (fine for synthetic textures)."""
    f = np.fft.rfft(x)
    f[int(cutoff / (SR / 2) * len(f)) :] = 0
    return np.fft.irfft(f, len(x))


def _band(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    f = np.fft.rfft(x)
    k = np.arange(len(f)) * (SR / 2) / len(f)
    f[(k < lo) | (k > hi)] = 0
    return np.fft.irfft(f, len(x))


def _bursts(n: int, times: np.ndarray, burst: np.ndarray) -> np.ndarray:
    out = np.zeros(n)
    for t0 in (times * SR).astype(int):
        m = min(len(burst), n - t0)
        if m > 0:
            out[t0 : t0 + m] += burst[:m]
    return out


def event(name: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """One clip of sound event ``name`` (float64, peak about 1 before the noise floor)."""
    t = _t(seconds)
    n = len(t)
    u = lambda a, b: float(rng.uniform(a, b))
    if name == "siren":
        f = u(500, 1200) + u(150, 500) * np.sin(2 * np.pi * u(0.3, 2.5) * t)
        x = np.sin(2 * np.pi * np.cumsum(f) / SR) + 0.3 * np.sin(4 * np.pi * np.cumsum(f) / SR)
    elif name in ("knock", "footsteps", "clap"):
        if name == "knock":
            times = np.cumsum(rng.uniform(0.12, 0.3, size=int(rng.integers(2, 6)))) + u(0, 0.3)
            burst = _lowpass(rng.standard_normal(int(0.05 * SR)), u(300, 900)) * np.exp(-_t(0.05) * u(60, 120))
        elif name == "footsteps":
            steps = np.arange(u(0, 0.2), seconds, u(0.4, 0.65))
            times = np.clip(steps + rng.normal(0, 0.02, size=len(steps)), 0, None)
            burst = _lowpass(rng.standard_normal(int(0.12 * SR)), u(150, 500)) * np.exp(-_t(0.12) * u(25, 45))
        else:
            times = np.sort(rng.uniform(0, seconds, size=int(rng.integers(6, 20))))
            burst = _band(rng.standard_normal(int(0.03 * SR)), 800, 6000) * np.exp(-_t(0.03) * u(80, 200))
        x = _bursts(n, times, burst)
    elif name == "chirp":
        x = np.zeros(n)
        for t0 in np.sort(rng.uniform(0, max(seconds - 0.15, 0.01), size=int(rng.integers(3, 9)))):
            d = u(0.04, 0.12)
            tt = _t(d)
            f = u(2000, 4000) + u(1000, 3000) * tt / d
            seg = np.sin(2 * np.pi * np.cumsum(f) / SR) * np.hanning(len(tt))
            i = int(t0 * SR)
            x[i : i + len(seg)] += seg[: n - i]
    elif name == "engine":
        f0 = u(35, 110)
        x = sum(np.sin(2 * np.pi * f0 * k * t + u(0, 6.3)) / k for k in range(1, 9))
        x *= 1 + 0.4 * np.sin(2 * np.pi * u(4, 12) * t)
        x += 0.3 * _lowpass(rng.standard_normal(n), 400)
    elif name == "rain":
        drops = _bursts(n, rng.uniform(0, seconds, size=int(seconds * u(80, 250))), np.exp(-_t(0.004) * 900) * 0.8)
        x = drops + 0.5 * _lowpass(rng.standard_normal(n), u(3000, 7000))
    elif name == "bell":
        f0 = u(300, 900)
        x = np.zeros(n)
        for t0 in np.arange(0, seconds, u(0.6, 1.2)):
            tt = t[int(t0 * SR) :] - t0
            ring = sum(
                a * np.sin(2 * np.pi * f0 * r * tt) * np.exp(-tt * d)
                for r, a, d in ((1, 1, 2.5), (2.76, 0.6, 4), (5.4, 0.4, 6), (8.9, 0.2, 9))
            )
            x[int(t0 * SR) :] += ring
    elif name == "beep":
        f = u(1500, 3500)
        period, duty = u(0.15, 0.5), u(0.3, 0.7)
        x = np.sign(np.sin(2 * np.pi * f * t)) * 0.5 * ((t % period) < duty * period)
    else:  # wind
        x = rng.standard_normal(n)
        centre = u(300, 900) * (1 + 0.5 * np.sin(2 * np.pi * u(0.2, 0.8) * t))
        x = _band(x, 100, 1500) * (0.6 + 0.4 * np.sin(2 * np.pi * u(0.1, 0.5) * t + u(0, 6.3)))
        x *= centre / centre.mean()
    x = np.asarray(x, dtype=float)
    x /= np.abs(x).max() + 1e-9
    return x + 10 ** (-u(15, 35) / 20) * rng.standard_normal(n)  # noise floor at 15-35 dB below peak


def _note(f: float, seconds: float, instrument: str, rng: np.random.Generator) -> np.ndarray:
    t = _t(seconds)
    if instrument == "organ":
        x = sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, 7))
        env = np.minimum(1, t / 0.02) * np.minimum(1, (seconds - t) / 0.03 + 1e-3)
    elif instrument == "plucked string":
        x = sum(np.sin(2 * np.pi * f * k * t) * np.exp(-t * (3 + 2.5 * k)) / k for k in range(1, 10))
        env = np.minimum(1, t / 0.003)
    elif instrument == "clarinet":
        x = sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, 12, 2))
        env = np.minimum(1, t / 0.05) * np.minimum(1, (seconds - t) / 0.05 + 1e-3)
    else:  # electric piano: two-operator FM, modulation index decays
        index = 2.5 * np.exp(-t * 6)
        x = np.sin(2 * np.pi * f * t + index * np.sin(2 * np.pi * f * t)) * np.exp(-t * 2.5)
        env = np.minimum(1, t / 0.003)
    return np.clip(env, 0, 1) * x


def music(instrument: str, tempo: str, key: str, mode: str, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A melody in ``key`` ``mode`` at ``tempo`` over the tonic triad, played on ``instrument``."""
    bpm = float(rng.uniform(*TEMPI[tempo]))
    beat = 60.0 / bpm
    root = 48 + KEYS.index(key) + 12 * int(rng.integers(0, 2))  # MIDI C3.. B4
    scale = MODES[mode]
    midi = lambda m: 440.0 * 2 ** ((m - 69) / 12)
    n = int(seconds * SR)
    out = np.zeros(n)
    pos, degree = 0.0, int(rng.integers(0, 7))
    while pos < seconds:
        dur = beat * float(rng.choice([0.5, 1.0, 1.0, 2.0]))
        degree = int(np.clip(degree + rng.integers(-2, 3), -3, 10))
        pitch = root + 12 + scale[degree % 7] + 12 * (degree // 7)
        seg = _note(midi(pitch), min(dur, seconds - pos), instrument, rng)
        i = int(pos * SR)
        out[i : i + len(seg)] += seg[: n - i]
        pos += dur
    for interval in (0, scale[2], 7):  # the triad carries the mode even when the melody is ambiguous
        out += 0.35 * _note(midi(root + interval), seconds, "organ" if instrument != "organ" else "clarinet", rng)
    # A soft hi-hat on every beat: without it, tempo was unlearnable for a tiny model (chance after
    # 300 steps) since organ and clarinet notes have no attack to count.
    tick = _band(rng.standard_normal(int(0.08 * SR)), 4000, 7900) * np.exp(-_t(0.08) * 40)
    beats = np.arange(float(rng.uniform(0, beat)), seconds, beat)
    out += 1.5 * np.abs(out).max() / (np.abs(tick).max() + 1e-9) * _bursts(n, beats, tick)
    out /= np.abs(out).max() + 1e-9
    return out + 10 ** (-float(rng.uniform(25, 40)) / 20) * rng.standard_normal(n)


def music_caption(instrument: str, tempo: str, key: str, mode: str) -> str:
    """``"a slow piece in A minor on a plucked string"``."""
    article = "an" if instrument[0] in "aeiou" else "a"
    return f"a {tempo} piece in {key} {mode} on {article} {instrument}"
