"""``dac``: the Descript Audio Codec (Kumar et al. 2023, "High-Fidelity Audio Compression with Improved
RVQGAN", arXiv 2306.06546) on ``transformers.DacModel``: the codec UniMoE-Audio writes speech and music in.

A non-causal conv encoder (Snake activations, strides ``downsampling_ratios``, hop = their product:
320 at 16 kHz, 512 at 24 and 44.1 kHz) gives latents that ``n_codebooks`` factorised VQ stages
quantise (each stage projects the residual to ``codebook_dim`` and picks the nearest
L2-normalised code: cosine similarity). The input is zero-padded to a multiple of the hop, as
``DacFeatureExtractor`` pads it, so ``F = ceil(T / hop)``. ``num_quantizers`` keeps the first
stages (``n_quantizers`` of ``DacModel.encode``). Decoding sums the chosen codes' projections and
runs the transposed-conv decoder: about ``F * hop`` samples (odd strides drop a few).

Padding: the encoder is not causal, so a frame sees ``lookahead`` samples after its own span;
a padded item's codes equal its codes encoded alone up to the last frames within that reach
(exactly equal to its codes alone zero-padded to the batch's length: items never mix).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from pydantic import Field

from audiomoe.codecs.hf_codec import HFCodec
from audiomoe.core.errors import AudioMoEError


class DAC(HFCodec):
    """Descript Audio Codec: waveforms at ``sampling_rate`` <-> ``n_codebooks`` x ``codebook_size`` codes per hop."""

    model_type: ClassVar[str] = "dac"
    hf_classes: ClassVar[tuple[str, str]] = ("DacConfig", "DacModel")
    tiny_config: ClassVar[dict[str, Any]] = dict(
        encoder_hidden_size=4,
        downsampling_ratios=[2, 4, 5, 8],
        decoder_hidden_size=32,
        n_codebooks=4,
        codebook_size=64,
        codebook_dim=4,
        sampling_rate=16000,
    )

    class Params(HFCodec.Params):
        num_quantizers: Optional[int] = Field(
            None, ge=1, description="codebooks kept (the first ones); None = all n_codebooks of the model"
        )

    def _setup(self, config: Any) -> None:
        k = self.params.num_quantizers
        if k is not None and k > config.n_codebooks:
            raise AudioMoEError(f"codec 'dac': num_quantizers={k} exceeds the model's n_codebooks={config.n_codebooks}")
        self.sample_rate = int(config.sampling_rate)
        self.hop = int(config.hop_length)
        self.num_codebooks = int(k or config.n_codebooks)
        self.codebook_size = int(config.codebook_size)

    @property
    def lookahead(self) -> int:
        """Samples after a frame's own span that its code depends on (the non-causal receptive field's right side).

        First conv (kernel 7): 3; per encoder block at input stride ``S``: residual units of kernel 7,
        dilations 1, 3, 9 (``3 * 13 * S``) and the strided conv (``floor(s / 2) * S``); last conv
        (kernel 3, at the hop): ``hop``.
        """
        total, stride = 3 + self.hop, 1
        for s in self.model.config.downsampling_ratios:
            total += 39 * stride + (s // 2) * stride
            stride *= s
        return total

    def _encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pad = -x.shape[-1] % self.hop
        x = torch.nn.functional.pad(x, (0, pad))
        return self.model.encode(x, n_quantizers=self.num_codebooks).audio_codes

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(audio_codes=codes).audio_values
