"""The one resampler every path uses (model features, loader, predict, eval, corpus making), with one bound.

torchaudio's windowed-sinc resampler (``sinc_interp_hann``, 6 zero crossings, rolloff 0.99) builds a
polyphase kernel of ``new' x (orig' + 2 * width)`` taps, where ``new'/orig'`` is the rate ratio in
lowest terms. For a standard pair the terms are small (48000 -> 16000 Hz is 1/3, 44100 -> 16000 Hz
160/441), but an odd rate makes them huge: 48001 -> 16000 Hz is 16000/48001 and asks for a kernel of
several gigabytes. :func:`resample_ratio` therefore keeps both terms at most ``MAX_RESAMPLE_TERM``
(:mod:`audiomoe.core.limits`): a ratio that does not fit is replaced by its closest fraction with
small terms (``Fraction.limit_denominator``), accepted only when it changes the rate by less than
``MAX_RESAMPLE_RATE_ERROR`` (1e-3; 48001 -> 16000 Hz becomes 1/3, an error of 2e-5). The kernel is
then at most about a million taps (a few MB), whatever the input; the work is linear in its length.

Accuracy: within the 0.99 rolloff of the lower Nyquist frequency the passband is flat to about
0.1 dB; an approximated ratio plays the clip at a rate off by less than 0.1 % (a pitch change under
2 cents, well below what any task hears), and its length follows the approximated ratio.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from typing import Any

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.limits import MAX_RESAMPLE_RATE_ERROR, MAX_RESAMPLE_TERM


def resample_ratio(orig: int, new: int) -> tuple[int, int]:
    """``(orig', new')`` with ``new'/orig'`` = ``new/orig`` reduced, both terms <= ``MAX_RESAMPLE_TERM``.

    A ratio whose reduced terms are larger is replaced by its closest fraction with small terms when
    that changes the rate by less than ``MAX_RESAMPLE_RATE_ERROR``; otherwise the rate is refused.
    """
    exact = Fraction(new, orig)
    if exact.numerator <= MAX_RESAMPLE_TERM and exact.denominator <= MAX_RESAMPLE_TERM:
        return exact.denominator, exact.numerator
    approx = exact.limit_denominator(MAX_RESAMPLE_TERM)
    err = abs(float(approx / exact) - 1.0) if approx else 1.0
    if approx.numerator > MAX_RESAMPLE_TERM or err > MAX_RESAMPLE_RATE_ERROR:
        raise AudioMoEError(
            f"cannot resample {orig} Hz to {new} Hz: the ratio has no close fraction with terms "
            f"<= {MAX_RESAMPLE_TERM}; "
            f"resample the audio to a standard rate (e.g. {new} Hz) beforehand"
        )
    return approx.denominator, approx.numerator


def resample_audio(x: Any, orig: int, new: int) -> Any:
    """Resample ``x`` (torch tensor or numpy array, time on the last axis) from ``orig`` to ``new`` Hz.

    Returns the same kind of array (numpy in, numpy out; float32 or the tensor's float dtype). The
    output has ``ceil(T * new' / orig')`` samples (torchaudio's length rule) for the bounded ratio.
    """
    import numpy as np
    import torch

    orig, new = int(orig), int(new)
    as_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) if as_numpy else x
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if orig != new:
        o, n = resample_ratio(orig, new)
        t = _resampler(o, n, t.dtype, str(t.device))(t)  # keeps autograd: a caller may differentiate through its input
    return t.numpy() if as_numpy else t


@lru_cache(maxsize=16)
def _resampler(orig: int, new: int, dtype: Any, device: str) -> Any:
    """torchaudio's resampler with its kernel built once: building it costs more than applying it to a short clip."""
    import torchaudio

    return torchaudio.transforms.Resample(orig, new, dtype=dtype).to(device)


def resample_batch(x: Any, lengths: Any, orig: int, new: int) -> tuple[Any, Any]:
    """Resample a right-padded batch ``x`` [B, T] with its ``lengths`` [B]; padding stays zero.

    The same kernel as :func:`resample_audio` (one bound): lengths scale by the bounded ratio.
    """
    import torch

    if orig == new:
        return x, lengths
    o, n = resample_ratio(int(orig), int(new))
    y = resample_audio(x, orig, new)
    new_lengths = torch.div(lengths * n, o, rounding_mode="floor").clamp_max(y.shape[1])
    pad = torch.arange(y.shape[1], device=y.device)[None, :] >= new_lengths[:, None]
    return y.masked_fill(pad, 0.0), new_lengths
