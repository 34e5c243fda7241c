"""Seeded on-the-fly augmentation: additive noise at an SNR, gain, and synthetic reverb.

Every effect draws from a ``numpy`` generator seeded by the sampler per item and epoch, so the
same run gives the same augmented audio in any worker. Reverb convolves with an exponentially
decaying noise impulse response (the classic synthetic-RIR model: decay time = RT60, a direct
path at t = 0), then rescales to the dry peak so loudness stays comparable.
"""

from __future__ import annotations

import numpy as np


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` plus white noise scaled to ``snr_db`` relative to the signal power."""
    power = float(np.mean(x**2)) + 1e-12
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return x + noise * np.sqrt(power / 10 ** (snr_db / 10)).astype(np.float32)


def reverb(x: np.ndarray, sample_rate: int, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a synthetic impulse response of decay time ``rt60`` seconds (60 dB decay)."""
    n = max(int(rt60 * sample_rate), 1)
    t = np.arange(n) / sample_rate
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / max(rt60, 1e-3))
    ir[0] = 1.0
    size = 1 << int(np.ceil(np.log2(len(x) + n)))  # FFT convolution: a 0.5 s IR is 8000 taps
    wet = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[: len(x)]
    peak = float(np.abs(wet).max()) + 1e-9
    return (wet * (float(np.abs(x).max()) / peak)).astype(np.float32)


def augment(x: np.ndarray, sample_rate: int, spec, seed: int) -> np.ndarray:
    """Apply the effects of an :class:`~audiomoe.data.spec.AugmentSpec`, each with probability ``p``."""
    rng = np.random.default_rng(seed)
    if spec.reverb > 0 and rng.random() < spec.p:
        x = reverb(x, sample_rate, float(rng.uniform(0.1, spec.reverb)), rng)
    if spec.snr_db is not None and rng.random() < spec.p:
        x = add_noise(x, float(rng.uniform(*spec.snr_db)), rng)
    if spec.gain_db is not None and rng.random() < spec.p:
        x = x * np.float32(10 ** (rng.uniform(*spec.gain_db) / 20))
    return x.astype(np.float32, copy=False)
