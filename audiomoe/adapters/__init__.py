"""Adapters: audio frames -> the backbone's width (and frame rate), between the encoder and the backbone."""
