"""A pre-norm Transformer encoder whose FFNs are MoE layers (Switch Transformer / GShard layout).

Block: ``h = x + MHA(LN(x)); y = h + MoE(LN(h))``. The MoE FFN is a slot (``moe``, kind ``moe``), so
``--set backbone.moe.router=<name>`` swaps the routing policy of every layer at once; experts,
shared and null experts, capacity and dispatch are its options (defaults: 4 SwiGLU experts, linear
top-2, none shared or null, dropless, auto).
Each layer's routing record goes into the model's routing trace as ``layer<i>``.
"""

from __future__ import annotations

from audiomoe.backbones.blocks import MoEBackboneParams, MoEStackBackbone


class MoETransformer(MoEStackBackbone):
    """``num_layers`` Transformer blocks with MoE FFNs; router and expert chosen from the registry."""

    class Params(MoEBackboneParams):
        pass
