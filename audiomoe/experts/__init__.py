"""Expert FFNs, the MoE layer and the backbones built from it."""
