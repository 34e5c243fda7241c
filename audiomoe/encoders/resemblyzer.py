"""Resemblyzer's speaker encoder (Resemble AI, Apache-2.0; the GE2E d-vector model of Wan et al. 2018,
"Generalized End-to-End Loss for Speaker Verification") as a frame-level weak encoder (MoWE-Audio, issue 26).

The weights are the ``pretrained.pt`` the PyPI package ``resemblyzer`` installs (extra
``audiomoe[pretrained]``), read without importing the package (its ``__init__`` needs webrtcvad)
into modules of the same layout:

    x      = x * max(1, 10^(-30/20) / rms(x))      volume up to -30 dBFS, never down (``preprocess_wav``)
    M      = mel(x)                                 16 kHz, |STFT|^2 (n_fft 400 = 25 ms, hop 160 = 10 ms,
                                                    periodic Hann, centred, zero padding) @ 40 Slaney mel
                                                    filters: librosa.feature.melspectrogram, no log
    h_1..N = LSTM_3x256(M)                          one state per mel frame: 100 Hz, 256-d (``output: lstm``)
    e_t    = ReLU(W h_t + b)                        per frame (``output: projected``)

Resemblyzer's utterance embedding (:meth:`Resemblyzer.embed`) runs the LSTM on 1.6 s partials,
takes each partial's last state through ``ReLU(W h + b)``, L2-normalises, averages and
L2-normalises again, as ``VoiceEncoder.embed_utterance`` does. Resemblyzer's VAD silence trimming
is left out: it would cut frames out of the clip, so the features would no longer align in time.
The LSTM is causal and samples past each clip's length are zeroed, so a clip's valid frames do not
depend on the batch it is in.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Encoder, EncoderOutput
from audiomoe.core.specs import Params
from audiomoe.encoders.features import frames_mask, mel_filters, prepare_waveforms
from audiomoe.encoders.hf_common import freeze_
from audiomoe.encoders.packaged import package_file

SAMPLE_RATE = 16000
N_FFT, HOP, N_MELS = 400, 160, 40  # resemblyzer hparams: 25 ms window, 10 ms step, 40 channels
HIDDEN, LAYERS = 256, 3
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance (hparams.partials_n_frames)
TARGET_RMS = 10 ** (-30 / 20)  # hparams.audio_norm_target_dBFS = -30


def resemblyzer_mel(x: torch.Tensor) -> torch.Tensor:
    """Resemblyzer's mel power spectrogram of ``x`` [B, T] (16 kHz) -> [B, 1 + T // 160, 40] (no log)."""
    window = torch.hann_window(N_FFT, device=x.device, dtype=torch.float32)
    stft = torch.stft(x.float(), N_FFT, HOP, window=window, center=True, pad_mode="constant", return_complex=True)
    return (stft.abs().pow(2).transpose(1, 2)) @ mel_filters(N_MELS, N_FFT, SAMPLE_RATE, x.device)


def normalize_volume(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Raise each clip's gain so its RMS over valid samples is -30 dBFS; louder clips stay as they are."""
    valid = frames_mask(lengths, x.shape[1]).logical_not()
    rms = ((x * valid).pow(2).sum(1) / lengths.clamp_min(1)).sqrt()
    # a silent clip stays silent: 0 x a large finite gain, never inf x 0
    gain = (TARGET_RMS / rms.clamp_min(1e-10)).clamp_min(1.0)
    return x * gain[:, None]


class Resemblyzer(Encoder):
    """Resemblyzer's 3-layer LSTM speaker encoder: waveforms [B, T] at 16 kHz -> [B, N, 256] at 100 Hz."""

    class Params(Params):
        pretrained: bool = Field(
            True, description="load the weights shipped in the resemblyzer package (false: random init, no package)"
        )
        freeze: bool = Field(False, description="no gradients to the encoder's weights")
        output: Literal["lstm", "projected"] = Field(
            "lstm", description="per-frame top LSTM state h_t, or ReLU(linear(h_t)) (the embedding's projection)"
        )
        normalize_volume: bool = Field(
            True, description="raise each clip to -30 dBFS RMS (resemblyzer.preprocess_wav), never lower it"
        )

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, HIDDEN)
        if p.pretrained:
            path = package_file("resemblyzer", "pretrained.pt", "encoder 'resemblyzer'")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
            except (RuntimeError, KeyError, OSError) as exc:
                raise AudioMoEError(
                    f"encoder 'resemblyzer': '{path}' is not a readable Resemblyzer checkpoint ({exc}); "
                    "reinstall the package: pip install --force-reinstall 'audiomoe[pretrained]'"
                ) from exc
            # similarity_weight / _bias scale GE2E's training loss only; the encoder never uses them
            state = {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}
            self.load_state_dict(state, strict=True)
        self.sample_rate = SAMPLE_RATE
        self.frame_rate = SAMPLE_RATE / HOP
        self.output_dim = HIDDEN
        if p.freeze:
            freeze_(self)
        elif p.output == "lstm":
            # the projection is then used only by embed(): no task gradient reaches it, so it is not trained
            freeze_(self.linear)

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames of the centred STFT: ``1 + L // 160`` (none for an empty clip)."""
        return torch.where(lengths > 0, torch.div(lengths, HOP, rounding_mode="floor") + 1, 0)

    def _mel(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mel [B, F, 40], lengths) with samples past each clip's length zeroed first."""
        dev = self.linear.weight.device
        x, lengths = prepare_waveforms(waveforms, lengths, dev)
        x = x * frames_mask(lengths, x.shape[1]).logical_not()
        if self.params.normalize_volume:
            x = normalize_volume(x, lengths)
        return resemblyzer_mel(x).to(self.linear.weight.dtype), lengths

    def forward(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> EncoderOutput:
        """Encode ``waveforms`` [B, T] (16 kHz) with valid ``lengths`` [B] -> 100 Hz frame features."""
        mel, lengths = self._mel(waveforms, lengths)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.params.freeze):
            h, _ = self.lstm(mel)
            if self.params.output == "projected":
                h = torch.relu(self.linear(h))
        frames = self.num_frames(lengths).clamp_max(h.shape[1])
        pad = frames_mask(frames, h.shape[1])
        return EncoderOutput(h.masked_fill(pad[..., None], 0.0), pad)

    @torch.no_grad()
    def embed(
        self,
        waveforms: torch.Tensor,
        lengths: Optional[torch.Tensor] = None,
        rate: float = 1.3,
        min_coverage: float = 0.75,
    ) -> torch.Tensor:
        """Utterance embeddings [B, 256], L2-normalised, as ``VoiceEncoder.embed_utterance`` (module doc)."""
        if not (0 < min_coverage <= 1 and rate > 0):
            raise AudioMoEError(f"embed: need 0 < min_coverage <= 1 and rate > 0, got {min_coverage}, {rate}")
        dev = self.linear.weight.device
        x, lengths = prepare_waveforms(waveforms, lengths, dev)
        if self.params.normalize_volume:
            x = normalize_volume(x * frames_mask(lengths, x.shape[1]).logical_not(), lengths)
        step = int(round(SAMPLE_RATE / rate / HOP))
        if not 0 < step <= PARTIAL_FRAMES:
            raise AudioMoEError(f"embed: rate {rate} gives a partial step of {step} frames; use 0.625 <= rate <= 100")
        out = []
        for i in range(x.shape[0]):
            n = int(lengths[i])
            n_frames = -(-(n + 1) // HOP)
            starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
            last = starts[-1] * HOP
            if (n - last) / (PARTIAL_FRAMES * HOP) < min_coverage and len(starts) > 1:
                starts = starts[:-1]
            stop = (starts[-1] + PARTIAL_FRAMES) * HOP
            wav = nn.functional.pad(x[i, :n], (0, max(stop - n, 0)))
            mel = resemblyzer_mel(wav[None])[0].to(self.linear.weight.dtype)
            partials = torch.stack([mel[s : s + PARTIAL_FRAMES] for s in starts])
            _, (hidden, _) = self.lstm(partials)
            e = torch.relu(self.linear(hidden[-1]))
            e = e / e.norm(dim=1, keepdim=True)
            mean = e.mean(0)
            out.append(mean / mean.norm())
        return torch.stack(out)
