"""Codecs: audio <-> discrete tokens for generation targets (built-in ``mel_rvq``; DAC / EnCodec as plugins)."""
