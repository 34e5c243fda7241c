"""Registered expert FFNs (``swiglu``, ``mlp``); the MoE layer that runs them is in ``audiomoe.moe``."""
