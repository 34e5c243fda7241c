"""Every hard bound audiomoe enforces, declared once (specs, YAML loading, inputs, training).

A bound exists so that a typo or a hostile config fails at once with a clear message instead of
asking for terabytes, hanging, or overflowing. Raise one when a real use needs more: each name
below is the only place its value lives. No imports: the CLI and the registry read these before
torch is loaded.
"""

from __future__ import annotations

# -- model sizes ------------------------------------------------------------------------------
MAX_D_MODEL = 65_536
"""Widest shared representation a spec may ask for (Whisper-large is 1280, big LLMs ~16k)."""
MAX_PARAMETERS = 20_000_000_000
"""Most parameters ``validate`` / ``train`` accept (counted on the meta device, nothing allocated)."""

# -- seeds ------------------------------------------------------------------------------------
MAX_SEED = 2**32 - 1
"""Seeds lie in [0, MAX_SEED]: what torch, numpy and Python's random all accept."""

# -- audio input ------------------------------------------------------------------------------
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 768_000
"""Sample rates outside [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] Hz are refused as mistakes."""
MAX_RESAMPLE_TERM = 1_000
"""A resampling ratio is reduced to ``new/orig`` with both terms at most this (torchaudio's
polyphase kernel grows with them: 48001 -> 16000 Hz unreduced asks for gigabytes)."""
MAX_RESAMPLE_RATE_ERROR = 1e-3
"""Largest relative rate change accepted when a ratio is approximated to fit MAX_RESAMPLE_TERM."""
MAX_CHANNELS = 8
"""A last axis of at most this many entries after a long time axis reads as ``[B, T, C]``."""

# -- training ---------------------------------------------------------------------------------
MAX_BATCH_SIZE = 4_096
"""Items per step: more is a typo (a batch of 10**9 clips would ask for terabytes)."""
MAX_STEPS = 10**9
MAX_LR = 10.0
"""Learning rates lie in (0, MAX_LR]."""

# -- YAML configs -----------------------------------------------------------------------------
MAX_CONFIG_BYTES = 1_000_000
"""Largest config file read (a model spec is a few kilobytes)."""
MAX_YAML_DEPTH = 64
"""Deepest nesting of mappings / lists in a config."""
MAX_YAML_NODES = 100_000
"""Most nodes a config may expand to, aliases counted at every use ("billion laughs")."""
MAX_PRESET_CHAIN = 16
"""Most ``preset:`` includes followed from one config."""
MAX_QUOTED_VALUE = 200
"""Longest ``repr`` of a user value quoted in an error message (longer ones are cut)."""
