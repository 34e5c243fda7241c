"""``mel_rvq``: residual vector quantisation of normalised log-mel frames; Griffin-Lim decoding.

Encoding: log-mel frames ``x`` (``n_mels`` bins, hop ``hop_length``), normalised per bin by the
mean and std seen in ``fit``, are quantised in ``num_codebooks`` stages: stage ``q`` picks the
nearest centroid ``c_q`` of the residual ``r_q = x - sum_{j<q} c_j`` (the RVQ of SoundStream /
EnCodec, here with k-means codebooks instead of learned ones). ``fit`` runs seeded k-means
(k-means++ init, Lloyd iterations) stage by stage on frames of a corpus: seconds on CPU.
Decoding sums the chosen centroids, undoes the normalisation, maps mel back to a linear
spectrogram (``torchaudio.transforms.InverseMelScale``) and recovers a phase with Griffin-Lim
(``torchaudio.transforms.GriffinLim``), so generated tokens can be listened to. Unfitted, the
codebooks are seeded random normal vectors (valid but meaningless codes).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from pydantic import Field

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Codec
from audiomoe.core.specs import Params


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Centroids [k, D] of ``x`` [N, D]: k-means++ initialisation, then ``iters`` Lloyd steps."""
    n = x.shape[0]
    if n < k:
        raise AudioMoEError(f"k-means needs at least codebook_size={k} frames, got {n}; fit on more audio")
    cent = [x[int(torch.randint(n, (1,), generator=generator))]]
    d2 = torch.cdist(x, cent[0][None]).squeeze(1) ** 2
    for _ in range(1, k):
        i = int(torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones(n) / n, 1, generator=generator))
        cent.append(x[i])
        d2 = torch.minimum(d2, torch.cdist(x, x[i][None]).squeeze(1) ** 2)
    c = torch.stack(cent)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).clamp(min=1).unsqueeze(1)
        moved = sums / counts
        c = torch.where(torch.bincount(assign, minlength=k).unsqueeze(1) > 0, moved, c)  # empty clusters stay
    return c


class MelRVQ(Codec):
    """Residual VQ of normalised log-mel frames (k-means codebooks), decoded with Griffin-Lim."""

    class Params(Params):
        sample_rate: int = Field(16000, ge=1000, description="audio rate the codec works at")
        n_fft: int = Field(1024, ge=64, description="STFT size")
        hop_length: int = Field(256, ge=16, description="samples per frame (16 kHz / 256 = 62.5 frames/s)")
        n_mels: int = Field(80, ge=8, description="mel bins per frame")
        num_codebooks: int = Field(4, ge=1, le=32, description="RVQ stages")
        codebook_size: int = Field(256, ge=2, le=65536, description="centroids per stage")
        kmeans_iters: int = Field(15, ge=1, description="Lloyd iterations per stage in fit")
        fit_frames: int = Field(20000, ge=16, description="frames sampled from the fitting audio")
        griffin_lim_iters: int = Field(32, ge=1, description="Griffin-Lim iterations in decode")
        seed: int = Field(0, description="seed of the k-means initialisation and frame sampling")

    def __init__(self, params: Optional[Params] = None) -> None:
        super().__init__(params)
        import torchaudio

        p = self.params
        self.sample_rate, self.num_codebooks, self.codebook_size = p.sample_rate, p.num_codebooks, p.codebook_size
        self.frame_rate = p.sample_rate / p.hop_length
        self.mel = torchaudio.transforms.MelSpectrogram(
            p.sample_rate, n_fft=p.n_fft, hop_length=p.hop_length, n_mels=p.n_mels, power=1.0
        )
        g = torch.Generator().manual_seed(p.seed)
        self.register_buffer("codebooks", torch.randn(p.num_codebooks, p.codebook_size, p.n_mels, generator=g))
        self.register_buffer("mean", torch.zeros(p.n_mels))
        self.register_buffer("std", torch.ones(p.n_mels))
        self.register_buffer("fitted", torch.tensor(False))

    def frames(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel frames [B, F, n_mels] of ``waveforms`` [B, T]."""
        logmel = torch.log(self.mel(waveforms.float()) + 1e-5).transpose(1, 2)
        return (logmel - self.mean) / self.std

    @torch.no_grad()
    def fit(self, waveforms: Iterable[torch.Tensor]) -> "MelRVQ":
        """Fit the normalisation and every codebook (stage by stage on the residual) to 1-D clips."""
        frames = torch.cat([torch.log(self.mel(w.float()[None]) + 1e-5)[0].T for w in waveforms])
        g = torch.Generator().manual_seed(self.params.seed)
        if frames.shape[0] > self.params.fit_frames:
            frames = frames[torch.randperm(frames.shape[0], generator=g)[: self.params.fit_frames]]
        self.mean.copy_(frames.mean(0))
        self.std.copy_(frames.std(0).clamp(min=1e-3))
        residual = (frames - self.mean) / self.std
        for q in range(self.num_codebooks):
            c = kmeans(residual, self.codebook_size, self.params.kmeans_iters, g)
            self.codebooks[q].copy_(c)
            residual = residual - c[torch.cdist(residual, c).argmin(1)]
        self.fitted.fill_(True)
        return self

    @torch.no_grad()
    def encode(
        self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes [B, Q, F], frame lengths [B])``; frames past a clip's length are codes of padding."""
        x = self.frames(waveforms)
        b, f, d = x.shape
        residual = x.reshape(b * f, d)
        codes = []
        for q in range(self.num_codebooks):
            idx = torch.cdist(residual, self.codebooks[q]).argmin(1)
            codes.append(idx)
            residual = residual - self.codebooks[q][idx]
        n = lengths if lengths is not None else torch.full((b,), waveforms.shape[-1])
        frame_lengths = torch.div(n, self.params.hop_length, rounding_mode="floor") + 1
        return torch.stack(codes, 0).reshape(self.num_codebooks, b, f).transpose(0, 1), frame_lengths.clamp(max=f)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel frames [B, F, n_mels] from ``codes`` [B, Q, F] (sum over stages)."""
        if codes.dim() != 3 or codes.shape[1] > self.num_codebooks:
            raise AudioMoEError(f"codes must be [B, Q<= {self.num_codebooks}, F], got {tuple(codes.shape)}")
        return sum(self.codebooks[q][codes[:, q]] for q in range(codes.shape[1]))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Waveforms [B, (F - 1) * hop] from ``codes`` (Griffin-Lim phase; listenable, not hi-fi)."""
        import torchaudio

        p = self.params
        mel = torch.exp(self.dequantize(codes) * self.std + self.mean).transpose(1, 2)  # [B, n_mels, F]
        frames = mel.shape[-1]
        if frames < 2:  # (F - 1) * hop samples: nothing to hear
            return mel.new_zeros(mel.shape[0], 0)
        short = (
            p.n_fft // p.hop_length + 1 - frames
        )  # the centred inverse STFT needs n_fft / 2 samples of padding each side
        if short > 0:  # a few generated frames: pad with the quietest frame, decode, keep the frames' own samples
            mel = torch.cat([mel, mel.amin(-1, keepdim=True).expand(*mel.shape[:2], short)], -1)
        inv = torchaudio.transforms.InverseMelScale(p.n_fft // 2 + 1, p.n_mels, p.sample_rate)
        spec = inv(mel).clamp(min=0)
        gl = torchaudio.transforms.GriffinLim(
            n_fft=p.n_fft, hop_length=p.hop_length, n_iter=p.griffin_lim_iters, power=1.0, rand_init=False
        )
        return gl(spec)[:, : (frames - 1) * p.hop_length]
