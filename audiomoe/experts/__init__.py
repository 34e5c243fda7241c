"""Expert FFNs (swiglu, mlp), the MoE layer (routed, shared and null experts; sorted dropless
dispatch; torch and xformers backends), the MoE backbones and upcycling of dense causal LMs."""
