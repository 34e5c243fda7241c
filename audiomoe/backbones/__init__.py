"""Backbones: the decoder every task shares (``causal_lm``, ``moe_transformer``, ``unimoe_transformer``), their blocks, upcycling, weight interop and HF LM loading."""
