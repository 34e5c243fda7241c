"""On-device audio front-end maths shared by the encoders (plain functions, no components).

- :func:`prepare_waveforms`: the one place raw input is checked and made canonical: a float32
  ``[B, T]`` mono tensor on the model's device plus ``lengths`` [B]. Integer PCM (int16/int32,
  numpy or torch) is scaled to [-1, 1); a channel axis ``[B, C, T]`` is down-mixed to mono by
  averaging the channels; an empty batch and NaN/inf samples are refused, naming the items.
- :func:`whisper_log_mel`: Whisper's log-mel spectrogram in torch, batched, matching
  ``transformers.WhisperFeatureExtractor`` (STFT n_fft=400, hop=160, Hann, Slaney mel filters,
  ``log10(max(mel, 1e-10))``, clamp to ``max - 8``, then ``(x + 4) / 4``).
- :func:`normalize_waveforms`: zero-mean unit-variance per utterance over its valid samples,
  as ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm`` does (eps 1e-7, padding kept at 0).
- :func:`frames_mask`: valid frame counts -> a padding mask (True = padded).
- :func:`resample`: a padded batch with its lengths through the kit's one bounded resampler
  (:mod:`audiomoe.core.resample`: a ratio with large terms, 48001 -> 16000 Hz, is approximated).
- :func:`check_sample_rate`, :func:`check_min_length`: a bad rate or a clip shorter than the
  encoder's receptive field is an :class:`AudioMoEError` saying what to do, not a torch error.

Bounds (rates, channels, resampling terms) live in :mod:`audiomoe.core.limits`.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from audiomoe.core.errors import AudioMoEError, short_repr
from audiomoe.core.limits import MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from audiomoe.core.resample import resample_batch as resample
from audiomoe.core.resample import resample_ratio

__all__ = [
    "check_min_length",
    "check_sample_rate",
    "frames_mask",
    "mel_filters",
    "normalize_waveforms",
    "prepare_waveforms",
    "resample",
    "resample_ratio",
    "whisper_log_mel",
]


def check_sample_rate(sample_rate: Any) -> int:
    """Return ``sample_rate`` as an int, or raise: it must be a whole number of Hz within the limits."""
    sr = sample_rate
    if isinstance(sr, torch.Tensor) and sr.numel() == 1:
        sr = sr.item()
    if isinstance(sr, (np.integer, np.floating)):
        sr = sr.item()
    if isinstance(sr, float) and sr.is_integer():
        sr = int(sr)
    if isinstance(sr, bool) or not isinstance(sr, int):
        raise AudioMoEError(f"sample_rate must be a whole number of Hz (e.g. 16000), got {short_repr(sample_rate)}")
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioMoEError(
            f"sample_rate {sr} Hz is outside [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]; give the clip's real rate in Hz"
        )
    return sr


def prepare_waveforms(
    waveforms: Any, lengths: Optional[Any] = None, device: Optional[torch.device] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check and canonicalise input audio -> (float32 [B, T] mono, lengths long [B]).

    Accepts torch tensors or numpy arrays shaped [T] (one clip), [B, T] or [B, C, T] (channels
    are averaged: the mono down-mix happens here, in every encoder's forward). Integer dtypes are
    PCM: divided by 2**(bits-1). ``lengths`` default to the full T and are clamped to [0, T].
    """
    if isinstance(waveforms, np.ndarray):
        waveforms = torch.from_numpy(np.ascontiguousarray(waveforms))
    if not isinstance(waveforms, torch.Tensor):
        raise AudioMoEError(
            f"waveforms must be a torch.Tensor or numpy array, got {type(waveforms).__name__}; "
            "convert it first, e.g. torch.tensor(samples, dtype=torch.float32)"
        )
    x = waveforms
    if x.dtype == torch.bool or x.is_complex():
        raise AudioMoEError(f"waveforms must be real audio samples, got dtype {x.dtype}")
    if not x.is_floating_point():
        if x.dtype not in (torch.int16, torch.int32, torch.int8, torch.uint8):
            raise AudioMoEError(f"integer waveforms must be PCM int8/int16/int32, got {x.dtype}")
        if x.dtype == torch.uint8:  # 8-bit PCM is offset binary
            x = (x.to(torch.float32) - 128.0) / 128.0
        else:
            x = x.to(torch.float32) / float(2 ** (torch.iinfo(x.dtype).bits - 1))
    if x.dim() == 1:
        x = x[None]
    if x.dim() == 3 and x.shape[2] <= MAX_CHANNELS < x.shape[1]:  # [B, T, C] (soundfile's layout)
        raise AudioMoEError(
            f"waveforms of shape {tuple(x.shape)} look like [batch, samples, channels]; audiomoe takes "
            "[batch, channels, samples]: pass waveforms.transpose(1, 2) (or down-mix with .mean(-1))"
        )
    if x.dim() == 2 and x.shape[1] <= MAX_CHANNELS < x.shape[0]:  # [T, C]: one multichannel clip
        raise AudioMoEError(
            f"waveforms of shape {tuple(x.shape)} look like [samples, channels] of one clip; "
            "pass waveforms.T[None] ([1, channels, samples]) or waveforms.mean(-1)"
        )
    if x.dim() == 3:
        x = x.to(torch.float32).mean(1)
    if x.dim() != 2:
        raise AudioMoEError(
            f"waveforms must be [samples], [batch, samples] or [batch, channels, samples]; got shape {tuple(waveforms.shape)}"
        )
    if device is not None:
        x = x.to(device)
    x = x.to(torch.float32)
    b, t = x.shape
    if b == 0 or t == 0:
        raise AudioMoEError(
            f"empty waveform batch (shape {tuple(x.shape)}): give at least one item with at least one sample"
        )
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.long, device=x.device)
    else:
        lengths = torch.as_tensor(lengths, device=x.device).long().reshape(-1)
        if lengths.numel() != b:
            raise AudioMoEError(f"lengths has {lengths.numel()} entries for {b} waveforms; give one per item")
        if bool((lengths < 0).any()):
            raise AudioMoEError(f"lengths must be >= 0, got {lengths.tolist()}")
        lengths = lengths.clamp_max(t)
    valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
    bad = (~torch.isfinite(x) & valid).any(1)
    if bool(bad.any()):
        items = bad.nonzero().flatten().tolist()
        raise AudioMoEError(f"waveforms contain NaN or inf samples in item(s) {items}; clean or drop those clips")
    x = x.masked_fill(~valid, 0.0)
    # Per-item energy: the statistic every normaliser builds on. If it overflows float32 (samples
    # near 1e19 and up) the normalised clip would silently read as silence.
    loud = ~torch.isfinite(x.pow(2).sum(1))
    if bool(loud.any()):
        items = loud.nonzero().flatten().tolist()
        peak = float(x[loud].abs().max())
        raise AudioMoEError(
            f"waveform item(s) {items} are too loud to process (peak {peak:.3g}; their energy overflows float32); "
            "float audio should lie in [-1, 1]: divide by the peak or by 2**(bits-1)"
        )
    return x, lengths


def check_min_length(encoder: Any, lengths: torch.Tensor) -> None:
    """Raise when an item is shorter than ``encoder``'s receptive field (it would give no frame)."""
    frames = encoder.num_frames(lengths)
    short = (frames < 1).nonzero().flatten().tolist()
    if not short:
        return
    n = 1  # smallest length with one frame: double, then bisect (num_frames is monotone)
    while int(encoder.num_frames(torch.tensor([n]))[0]) < 1 and n < 2**31:
        n *= 2
    lo, hi = n // 2 + 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if int(encoder.num_frames(torch.tensor([mid]))[0]) >= 1 else (mid + 1, hi)
    have = lengths[short].tolist()
    raise AudioMoEError(
        f"item(s) {short[:20]} have {have[:20]} samples, shorter than the encoder's receptive field: it needs at least "
        f"{lo} samples ({lo / encoder.sample_rate * 1000:.1f} ms at {encoder.sample_rate} Hz); pad those clips or drop them"
    )


def frames_mask(num_frames: torch.Tensor, total: int) -> torch.Tensor:
    """Padding mask [B, total] (True = padded) for ``num_frames`` [B] valid frames per item."""
    return torch.arange(total, device=num_frames.device)[None, :] >= num_frames[:, None]


def normalize_waveforms(x: torch.Tensor, lengths: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Zero-mean unit-variance per item over its first ``lengths`` samples; padding stays 0."""
    valid = frames_mask(lengths, x.shape[1]).logical_not()
    n = lengths.clamp_min(1)[:, None].to(x.dtype)
    xm = x * valid
    mean = xm.sum(1, keepdim=True) / n
    var = ((xm - mean) * valid).pow(2).sum(1, keepdim=True) / n
    bad = ~torch.isfinite(var.flatten())
    if bool(bad.any()):
        raise AudioMoEError(
            f"the variance of waveform item(s) {bad.nonzero().flatten().tolist()} overflows float32; scale them into [-1, 1]"
        )
    return ((x - mean) / torch.sqrt(var + eps)) * valid


_MEL_CACHE: dict[tuple[int, int, int, str, str], torch.Tensor] = {}


def mel_filters(n_mels: int, n_fft: int, sample_rate: int, device: torch.device) -> torch.Tensor:
    """Slaney-scale, Slaney-normalised mel filterbank [n_fft//2 + 1, n_mels] (Whisper's), cached."""
    key = (n_mels, n_fft, sample_rate, str(device), "slaney")
    fb = _MEL_CACHE.get(key)
    if fb is None:
        import torchaudio.functional as AF

        fb = AF.melscale_fbanks(
            n_fft // 2 + 1, 0.0, sample_rate / 2.0, n_mels, sample_rate, norm="slaney", mel_scale="slaney"
        ).to(device)
        _MEL_CACHE[key] = fb
    return fb


def whisper_log_mel(
    x: torch.Tensor, n_mels: int = 80, n_fft: int = 400, hop: int = 160, sample_rate: int = 16000
) -> torch.Tensor:
    """Whisper log-mel of a batch ``x`` [B, T] -> [B, n_mels, T // hop] (per-item max clamp)."""
    window = torch.hann_window(n_fft, device=x.device, dtype=torch.float32)
    stft = torch.stft(x.float(), n_fft, hop, window=window, return_complex=True)
    power = stft[..., :-1].abs().pow(2)
    mel = mel_filters(n_mels, n_fft, sample_rate, x.device).T @ power
    log_spec = mel.clamp_min(1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0
