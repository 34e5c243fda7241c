"""Codecs: audio <-> discrete tokens for generation targets (``mel_rvq``; ``dac``, ``encodec``, ``mimi`` on transformers)."""
