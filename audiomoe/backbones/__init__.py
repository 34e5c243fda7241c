"""Backbones: the decoder every task shares (``causal_lm``; the MoE transformers live in ``experts/``)."""
