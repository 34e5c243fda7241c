"""A pre-norm Transformer encoder whose FFNs are MoE layers (Switch Transformer / GShard layout).

Block: ``h = x + MHA(LN(x)); y = h + MoE(LN(h))``. The router and expert kinds are slots, so
``--set backbone.router=<name>`` swaps the routing policy of every layer at once; shared and null
experts, capacity and the backend are options of every layer (defaults: none, dropless, auto).
Each layer's routing record goes into the model's routing trace as ``layer<i>``.
"""

from __future__ import annotations

from audiomoe.experts.transformer import MoEBackboneParams, MoEStackBackbone


class MoETransformer(MoEStackBackbone):
    """``num_layers`` Transformer blocks with MoE FFNs; router and expert chosen from the registry."""

    class Params(MoEBackboneParams):
        pass
