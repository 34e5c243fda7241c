"""wav2vec 2.0 (Baevski et al. 2020, "wav2vec 2.0: A Framework for Self-Supervised Learning of Speech
Representations") on ``transformers.Wav2Vec2Model``: base, large, XLS-R or a local fine-tuned checkpoint
(a CTC head in the checkpoint is ignored).

Same pipeline as HuBERT (:mod:`audiomoe.encoders.ssl_base`): 320 samples per frame (50 Hz) for the
released checkpoints.
"""

from __future__ import annotations

from audiomoe.encoders.ssl_base import SSLEncoder, SSLParams


class Wav2Vec2(SSLEncoder):
    """wav2vec 2.0 encoder: waveforms [B, T] at 16 kHz -> [B, N, hidden_size]."""

    family = "wav2vec2"

    class Params(SSLParams):
        """wav2vec2 knobs (see :class:`audiomoe.encoders.ssl_base.SSLParams`)."""

    @classmethod
    def hf_classes(cls) -> tuple[type, type]:
        """(Wav2Vec2Config, Wav2Vec2Model)."""
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        return Wav2Vec2Config, Wav2Vec2Model
