"""Linear top-k router (Shazeer et al. 2017 / Switch / Mixtral): ``p = softmax(x W)``, keep the k largest.

Equation: ``w_i = p_i / sum_{j in topk} p_j`` for the k selected columns when ``normalize`` (Mixtral),
else ``w_i = p_i``; for k = 1 the renormalised weight is the constant 1, so ``top1`` gives ``P``
(Switch) or a straight-through ``1 + P - sg(P)`` instead (the router must learn from the task). Aux loss: Switch load balance ``E * sum_i f_i P_i`` times ``aux_loss_weight``.
The simplest learned router; kept as a baseline for ablations.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Router, Routing
from audiomoe.core.specs import Params
from audiomoe.routers.functional import make_routing, switch_balance_loss, top_k_select


class LinearTopK(Router):
    """Token or sample router: a bias-free linear gate and a top-k selection."""

    class Params(Params):
        k: int = Field(2, ge=1, description="columns selected per item")
        normalize: bool = Field(True, description="renormalise the k selected probabilities to sum to 1")
        top1: Literal["raw", "straight_through"] = Field(
            "raw", description="k=1 with normalize: weight P (Switch) or straight-through 1 + P - sg(P); both give the router a task gradient"
        )
        aux_loss_weight: float = Field(0.01, ge=0.0, description="weight of the Switch load-balance loss")

    def __init__(self, params: Params, *, d_model: int, num_experts: int) -> None:
        super().__init__(params)
        if self.params.k > num_experts:
            raise AudioMoEError(f"router k={self.params.k} is larger than the number of columns ({num_experts}); use k <= {num_experts}")
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None) -> Routing:
        """Route ``inputs`` [N, D] to ``k`` of ``num_experts`` columns."""
        logits = self.gate(inputs)
        if not torch.isfinite(logits).all():
            raise AudioMoEError("router logits contain NaN or inf: check the inputs (and the learning rate)")
        mask, weights, probs = top_k_select(logits.float(), self.params.k, self.params.normalize, self.params.top1)
        aux = {}
        if self.params.aux_loss_weight > 0:
            aux["balance"] = self.params.aux_loss_weight * switch_balance_loss(probs, mask, item_mask)
        return make_routing(logits, mask, weights.to(inputs.dtype), item_mask, aux)
