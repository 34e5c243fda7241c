"""``encodec``: EnCodec (Défossez et al. 2022, "High Fidelity Neural Audio Compression", arXiv 2210.13438)
on ``transformers.EncodecModel``: the 24 kHz speech/audio model and MusicGen's 32 kHz music tokenizer.

A SEANet conv encoder with an LSTM (causal convs, strides ``upsampling_ratios``: hop 320 at
24 kHz, 75 frames/s) gives latents quantised by residual VQ; the number of stages follows the
target ``bandwidth`` in kbps: ``K = floor(1000 * bandwidth / (frame_rate * log2(codebook_size)))``
(24 kHz: 1.5 -> 2, 6 -> 8, 24 -> 32 codebooks of 1024). ``bandwidth`` None takes the smallest of
``target_bandwidths``, as ``EncodecModel.encode`` does. Samples past each length are zeroed and
given as ``padding_mask`` (the model multiplies the input by it). ``F = ceil(T / hop)``.

Supported: mono models without chunking or loudness normalisation (``chunk_length_s`` None,
``normalize`` False: 24 and 32 kHz). The 48 kHz model encodes overlapping 1 s chunks each with
its own scale, which codes [K, F] alone cannot carry: refused with the reason.

Padding: the convs are causal (``use_causal_conv``, the released models) and the LSTM runs
forward, but their left padding is a reflection (``pad_mode="reflect"``): the first frames also
see the next ``last_kernel_size - 1`` frames (6), mirrored. So a padded item's codes over its
frames equal its codes encoded alone when it has at least ``last_kernel_size`` frames (7) and
its length is a multiple of the hop (otherwise all but its last, partial frame, which the
model pads itself); a shorter item's first frames also see the padding, through the mirror.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
from pydantic import Field

from audiomoe.codecs.hf_codec import HFCodec
from audiomoe.core.errors import AudioMoEError


class EnCodec(HFCodec):
    """EnCodec: waveforms at ``sampling_rate`` <-> the codebooks of one target bandwidth per hop."""

    model_type: ClassVar[str] = "encodec"
    hf_classes: ClassVar[tuple[str, str]] = ("EncodecConfig", "EncodecModel")
    tiny_config: ClassVar[dict[str, Any]] = dict(
        num_filters=4,
        hidden_size=16,
        upsampling_ratios=[8, 5, 4, 2],
        num_lstm_layers=1,
        codebook_size=64,
        target_bandwidths=[1.5, 3.0, 6.0],
        sampling_rate=24000,
    )

    class Params(HFCodec.Params):
        bandwidth: Optional[float] = Field(
            None, gt=0, description="target kbps, one of the model's target_bandwidths; None = the smallest"
        )

    def _setup(self, config: Any) -> None:
        if config.chunk_length_s is not None or config.normalize or config.audio_channels != 1:
            raise AudioMoEError(
                "codec 'encodec': this model encodes in chunks with per-chunk loudness scales or in stereo "
                f"(chunk_length_s={config.chunk_length_s}, normalize={config.normalize}, "
                f"audio_channels={config.audio_channels}); codes [K, F] alone cannot be decoded. Use a mono model "
                "without chunking (encodec_24khz, encodec_32khz)"
            )
        bw = self.params.bandwidth
        bw = float(config.target_bandwidths[0]) if bw is None else float(bw)
        if bw not in [float(b) for b in config.target_bandwidths]:
            raise AudioMoEError(
                f"codec 'encodec': bandwidth {bw} is not one of the model's target_bandwidths {list(config.target_bandwidths)}"
            )
        self.bandwidth = bw
        self.causal = bool(config.use_causal_conv)
        self.sample_rate = int(config.sampling_rate)
        self.hop = int(config.hop_length)
        self.num_codebooks = int(self.model.quantizer.get_num_quantizers_for_bandwidth(bw))
        self.codebook_size = int(config.codebook_size)

    def _codebooks(self) -> list[tuple[Any, Callable[[torch.Tensor], None]]]:
        def setter(cb: Any) -> Callable[[torch.Tensor], None]:
            return lambda v: (cb.embed.copy_(v), cb.embed_avg.copy_(v))

        return [(layer.codebook, setter(layer.codebook)) for layer in self.model.quantizer.layers]

    def _encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model.encode(x, padding_mask=mask, bandwidth=self.bandwidth)
        return out.audio_codes[0]  # one "frame" (the whole clip) without chunking

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes[None], [None]).audio_values[:, 0]
