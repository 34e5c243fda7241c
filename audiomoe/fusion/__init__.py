"""Fusion components: how a mixture's weak-encoder features join the base features (MoWE-Audio)."""
