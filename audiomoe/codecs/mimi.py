"""``mimi``: Mimi (Défossez et al. 2024, "Moshi: a speech-text foundation model for real-time dialogue",
arXiv 2410.00037) on ``transformers.MimiModel``: 24 kHz audio at 12.5 frames/s.

A causal SEANet encoder (hop 960), a causal Transformer over its frames and a stride-2 downsample
(hop 1920) give latents quantised by a split RVQ: ``num_semantic_quantizers`` stages
distilled from WavLM, then acoustic stages; ``num_quantizers`` keeps the first of the
model's 32 (Moshi uses 8; at least the semantic ones). ``F = ceil(T / hop)``, which is
``MimiModel.get_encoded_length``. Samples past each length are zeroed; ``padding_mask`` is
passed, though transformers' Mimi encoder does not read it yet.

Padding: every layer is causal (left-padded convs, causal sliding-window attention), so a
padded item's codes over its frames equal its codes encoded alone whenever its length is a
multiple of the hop (otherwise all but its last, partial frame).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
from pydantic import Field

from audiomoe.codecs.hf_codec import HFCodec
from audiomoe.core.errors import AudioMoEError


class Mimi(HFCodec):
    """Mimi: 24 kHz waveforms <-> ``num_quantizers`` codebooks (semantic first) at 12.5 frames/s."""

    model_type: ClassVar[str] = "mimi"
    hf_classes: ClassVar[tuple[str, str]] = ("MimiConfig", "MimiModel")
    tiny_config: ClassVar[dict[str, Any]] = dict(
        hidden_size=16,
        num_filters=4,
        num_hidden_layers=1,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        codebook_size=64,
        codebook_dim=8,
        num_quantizers=4,
        vector_quantization_hidden_dimension=8,
        upsample_groups=16,
        sliding_window=16,
        max_position_embeddings=512,
    )

    class Params(HFCodec.Params):
        num_quantizers: Optional[int] = Field(
            None, ge=1, description="codebooks kept (semantic first); None = all of the model's num_quantizers"
        )

    def _setup(self, config: Any) -> None:
        k = self.params.num_quantizers
        if k is not None and not config.num_semantic_quantizers <= k <= config.num_quantizers:
            raise AudioMoEError(
                f"codec 'mimi': num_quantizers={k} must lie in [{config.num_semantic_quantizers}, "
                f"{config.num_quantizers}] (the semantic codebooks, up to the model's quantizers)"
            )
        if config.audio_channels != 1:
            raise AudioMoEError(f"codec 'mimi': audio_channels={config.audio_channels}; only mono models are supported")
        self.causal = True
        self.sample_rate = int(config.sampling_rate)
        self.hop = int(config.frame_size)
        self.num_codebooks = int(k or config.num_quantizers)
        self.codebook_size = int(config.codebook_size)

    def _codebooks(self) -> list[tuple[Any, Callable[[torch.Tensor], None]]]:
        def setter(cb: Any) -> Callable[[torch.Tensor], None]:
            def set_vectors(v: torch.Tensor) -> None:
                cb.embed_sum.copy_(v * cb.cluster_usage.clamp(min=cb.epsilon)[:, None])  # embed = embed_sum / usage
                cb._embed = None  # transformers caches embed on first use

            return set_vectors

        q = self.model.quantizer
        layers = [*q.semantic_residual_vector_quantizer.layers, *q.acoustic_residual_vector_quantizer.layers]
        return [(layer.codebook, setter(layer.codebook)) for layer in layers]

    def _encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x, padding_mask=mask, num_quantizers=self.num_codebooks).audio_codes

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes).audio_values[:, 0]
