"""HuBERT (Hsu et al. 2021, "HuBERT: Self-Supervised Speech Representation Learning by Masked
Prediction of Hidden Units") on ``transformers.HubertModel``: base, large, or any local fine-tuned
checkpoint (e.g. an emotion-recognition HuBERT-base such as ``superb/hubert-base-superb-er``,
whose classification head is ignored).

Pipeline (shared with WavLM / wav2vec2, see :mod:`audiomoe.encoders.ssl_base`): 16 kHz waveform
-> per-utterance normalisation when the checkpoint's feature extractor does it -> 7-layer conv
encoder (320 samples per frame, 50 Hz) -> Transformer -> ``h_l`` for the chosen layer(s).
"""

from __future__ import annotations

from audiomoe.encoders.ssl_base import SSLEncoder, SSLParams


class Hubert(SSLEncoder):
    """HuBERT encoder: waveforms [B, T] at 16 kHz -> [B, N, hidden_size]."""

    family = "hubert"

    class Params(SSLParams):
        """HuBERT knobs (see :class:`audiomoe.encoders.ssl_base.SSLParams`)."""

    @classmethod
    def hf_classes(cls) -> tuple[type, type]:
        """(HubertConfig, HubertModel)."""
        from transformers import HubertConfig, HubertModel

        return HubertConfig, HubertModel
