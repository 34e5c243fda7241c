"""WavLM (Chen et al. 2022, "WavLM: Large-Scale Self-Supervised Pre-Training for Full Stack Speech
Processing") on ``transformers.WavLMModel``: base, base-plus, large or a local fine-tuned checkpoint.

Same pipeline as HuBERT (:mod:`audiomoe.encoders.ssl_base`); WavLM's gated relative position bias
lives inside the transformers model. 320 samples per frame (50 Hz) for the released checkpoints.
"""

from __future__ import annotations

from audiomoe.encoders.ssl_base import SSLEncoder, SSLParams


class WavLM(SSLEncoder):
    """WavLM encoder: waveforms [B, T] at 16 kHz -> [B, N, hidden_size]."""

    family = "wavlm"

    class Params(SSLParams):
        """WavLM knobs (see :class:`audiomoe.encoders.ssl_base.SSLParams`)."""

    @classmethod
    def hf_classes(cls) -> tuple[type, type]:
        """(WavLMConfig, WavLMModel)."""
        from transformers import WavLMConfig, WavLMModel

        return WavLMConfig, WavLMModel
