"""Composite router: a scorer (what it looks at) x a selector (how many it picks) + balance losses.

Registered as ``scored``; ``top_k``, ``top_p``, ``dense``, ``mowe``, ``uniform``, ``random``,
``oracle`` and ``hash`` are registry presets of it (other defaults, see ``registry.yaml``), and
``linear_topk`` is a deprecated alias of ``top_k``. Selector knobs used in everyday ablations have
shortcuts on the router (``backbone.moe.router.k=1``, ``backbone.moe.router.p=0.6``), written into
the selector's params at validation so the resolved spec stays consistent.

``logits = scorer(x)`` -> optional training noise -> ``selection = selector(logits)``. Routes
tokens [N, D] (``item_mask`` [N]) or, for encoder-level routing, samples given as sequences
[B, T, D] (``item_mask`` [B, T] True = valid frame): the scorer pools valid frames and one
decision is made per sample. Losses, each with its weight, over valid items only (DESIGN.md):

- Switch load balance ``E * sum_i f_i P_i`` (Fedus et al. 2021), ``balance_weight``;
- UniMoE-Audio aux ``E * sum_i f_i P~_i`` with ``P~`` renormalised over the selected set, null
  columns counted; weight scheduled ``unimoe_aux_weight -> unimoe_aux_weight_end`` over
  ``unimoe_aux_steps`` optimizer steps (linear or cosine; UniMoE: 0.025 -> 0.001 over 10k), moved
  by the trainer through ``advance_schedule`` (never by a forward, so eval and generation leave it);
- router z-loss ``mean logsumexp(logits)^2`` (ST-MoE), ``z_loss_weight``;
- router entropy ``mean -sum P log P`` (Huang et al.'s dynamic loss), ``entropy_weight``.

Training noise: ``input_jitter`` multiplies the scorer's input by ``U(1 - eps, 1 + eps)``
(UniMoE-Audio: 0.01; after the cast to the scorer's compute dtype, as the released code), and the
jittered input is handed on (``Routing.inputs``) so an MoE layer's gated shared experts score it
too; ``logit_noise`` adds ``N(0, sigma^2)`` to the logits before selection.

Checkpoints of the old ``linear_topk`` class (a bare ``gate`` and no schedule buffer) load: their
``gate.weight`` is read as the linear scorer's weight and the schedule starts at step 0.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import torch
from pydantic import Field, model_validator

from audiomoe.core.decoding import is_generating
from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import Router, Routing
from audiomoe.core.specs import ComponentSpec, Params, Slot
from audiomoe.routers.functional import (
    check_logits,
    entropy_loss,
    make_routing,
    scheduled_weight,
    switch_balance_loss,
    unimoe_aux_loss,
    z_loss,
)


class ScoredRouter(Router):
    """Any scorer crossed with any selector, with Switch / UniMoE / z / entropy losses."""

    class Params(Params):
        scorer: Annotated[ComponentSpec, Slot("scorer")] = Field(
            default_factory=lambda: ComponentSpec(name="linear"), description="what the router looks at"
        )
        selector: Annotated[ComponentSpec, Slot("selector")] = Field(
            default_factory=lambda: ComponentSpec(name="top_k"), description="how many columns it picks"
        )
        input_jitter: float = Field(
            0.0, ge=0.0, lt=1.0, description="training: scorer input x U(1-eps, 1+eps) (UniMoE: 0.01)"
        )
        logit_noise: float = Field(
            0.0, ge=0.0, le=100.0, description="training: std of Gaussian noise added to the logits"
        )
        balance_weight: float = Field(0.01, ge=0.0, le=100.0, description="weight of the Switch load-balance loss")
        unimoe_aux_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of UniMoE's aux loss at step 0")
        unimoe_aux_weight_end: Optional[float] = Field(
            None, ge=0.0, le=100.0, description="weight after unimoe_aux_steps (None: constant weight)"
        )
        unimoe_aux_steps: int = Field(10000, ge=1, le=10**9, description="optimizer steps over which the weight moves")
        unimoe_aux_schedule: Literal["linear", "cosine"] = Field("linear", description="shape of the weight schedule")
        z_loss_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of the router z-loss (ST-MoE: 1e-3)")
        entropy_weight: float = Field(
            0.0, ge=0.0, le=100.0, description="weight of the router entropy (Huang et al.: 1e-4)"
        )
        k: Optional[int] = Field(
            None,
            ge=1,
            le=4096,
            description="columns selected per item: a shortcut for selector.k (None: the selector's own)",
        )
        p: Optional[float] = Field(
            None, gt=0.0, le=1.0, description="top-p threshold: a shortcut for selector.p (None: the selector's own)"
        )

        @model_validator(mode="after")
        def _push_shortcuts(self) -> Any:
            # Written into the selector's params, so the resolved spec says once what the selector
            # does; a selector without that knob then rejects it under its own key.
            for name in ("k", "p"):
                value = getattr(self, name)
                if value is not None:
                    sel = self.selector
                    object.__setattr__(
                        self, "selector", ComponentSpec(name=sel.name, params={**sel.params, name: value})
                    )
            return self

    def __init__(
        self,
        params: Params,
        *,
        d_model: int,
        num_experts: int,
        scorer: Any,
        selector: Any,
        task_names: Optional[list[str]] = None,
    ) -> None:
        super().__init__(params)
        self.num_experts = num_experts
        self.scorer = scorer(d_model=d_model, num_experts=num_experts, task_names=task_names)
        self.selector = selector(num_experts=num_experts)
        # Optimizer steps seen by the aux-weight schedule. Only the trainer moves it (through
        # advance_schedule, once per optimizer step), never a forward: generation, eval and
        # gradient accumulation would otherwise advance it. Persistent, so checkpoints resume it.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_pre_hook(_from_linear_topk)

    @property
    def k(self) -> Optional[int]:
        """Columns per item when the selector picks a fixed number (top-k: k, dense: all), else None."""
        name = type(self.selector).__name__
        if name == "Dense":
            return self.num_experts
        k = getattr(self.selector.params, "k", None)
        return int(k) if isinstance(k, int) else None

    def set_step(self, step: int) -> None:
        """Set the schedule position (optimizer steps seen), e.g. when resuming a run."""
        self.step.fill_(int(step))

    def set_aux_schedule(self, start: float, end: Optional[float], steps: int, kind: str = "linear") -> None:
        """Replace the UniMoE aux-weight schedule (a training stage's own ``aux_weight``), validated like the params.

        The component's spec is not changed: a resumed stage sets it again.
        """
        update = {
            "unimoe_aux_weight": start,
            "unimoe_aux_weight_end": end,
            "unimoe_aux_steps": steps,
            "unimoe_aux_schedule": kind,
        }
        self.params = type(self.params).model_validate({**self.params.model_dump(), **update})

    def advance_schedule(self) -> None:
        """One optimizer step passed: move the aux-weight schedule on (called by the trainer)."""
        self.step += 1

    def aux_weight(self) -> torch.Tensor:
        """The UniMoE aux-loss weight at the current step."""
        p = self.params
        return scheduled_weight(
            p.unimoe_aux_weight, p.unimoe_aux_weight_end, p.unimoe_aux_steps, self.step, p.unimoe_aux_schedule
        )

    def forward(
        self, inputs: torch.Tensor, item_mask: Optional[torch.Tensor] = None, task_ids: Optional[torch.Tensor] = None
    ) -> Routing:
        """Route tokens [N, D] (``item_mask`` [N]) or samples [B, T, D] (``item_mask`` [B, T]); True = valid."""
        if inputs.dim() == 3:
            b, t = inputs.shape[:2]
            if item_mask is not None and tuple(item_mask.shape) != (b, t):
                raise AudioMoEError(
                    f"router item_mask must be [B, T]={(b, t)} for sequence inputs, got {tuple(item_mask.shape)}"
                )
            frame_mask = item_mask
            valid = None if item_mask is None else item_mask.any(-1)
        elif inputs.dim() == 2:
            if item_mask is not None and tuple(item_mask.shape) != (inputs.shape[0],):
                raise AudioMoEError(f"router item_mask must be [N]={inputs.shape[0]}, got {tuple(item_mask.shape)}")
            frame_mask = valid = item_mask
        else:
            raise AudioMoEError(
                f"router inputs must be [N, D] tokens or [B, T, D] sequences, got shape {tuple(inputs.shape)}"
            )
        p = self.params
        cast = getattr(self.scorer, "compute_dtype", None)  # a scorer not built on Scorer keeps the dtype
        dtype = inputs.dtype if cast is None else cast(inputs.dtype)
        x = inputs if dtype == inputs.dtype else inputs.to(dtype)  # a no-op .to is still a dispatched op per layer
        if self.training and p.input_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - p.input_jitter, 1.0 + p.input_jitter)
        logits = self.scorer(x, frame_mask, task_ids)
        check_logits(logits, self.num_experts, f"{type(self.scorer).__name__}")
        logits = logits if logits.dtype == torch.float32 else logits.float()
        if self.training and p.logit_noise > 0:
            logits = logits + torch.randn_like(logits) * p.logit_noise
        sel = self.selector(logits)
        # no loss is taken while generating or without autograd: the aux terms would be computed for nothing
        aux = {} if is_generating() or not torch.is_grad_enabled() else self.aux_losses(logits, sel, valid)
        weights = sel.weights if sel.weights.dtype == inputs.dtype else sel.weights.to(inputs.dtype)
        routing = make_routing(logits, sel.mask, weights, valid, aux)
        routing.inputs = x if x.dim() == 2 else None  # what was scored: a shared gate scores the same
        routing.item_shape = tuple(inputs.shape[:-2]) if inputs.dim() == 3 else tuple(inputs.shape[:-1])
        return routing

    def aux_losses(self, logits: torch.Tensor, sel: Any, valid: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted balance / UniMoE / z / entropy losses of one selection over the valid items."""
        p = self.params
        aux: dict[str, torch.Tensor] = {}
        if p.balance_weight > 0:
            aux["balance"] = p.balance_weight * switch_balance_loss(sel.probs, sel.mask, valid)
        if p.unimoe_aux_weight > 0 or (p.unimoe_aux_weight_end or 0) > 0:
            aux["unimoe_aux"] = self.aux_weight() * unimoe_aux_loss(logits, sel.mask, valid)
        if p.z_loss_weight > 0:
            aux["z_loss"] = p.z_loss_weight * z_loss(logits, valid)
        if p.entropy_weight > 0:
            aux["entropy"] = p.entropy_weight * entropy_loss(sel.probs, valid)
        return aux


def _from_linear_topk(module: Any, state: dict, prefix: str, *_: Any) -> None:
    """Read a state dict of the old ``LinearTopK`` router (``gate.weight``, no ``step``) as this router's."""
    old, new = f"{prefix}gate.weight", f"{prefix}scorer.layers.0.weight"
    if old in state and new not in state and isinstance(getattr(module.scorer, "layers", None), torch.nn.ModuleList):
        state[new] = state.pop(old)
        state.setdefault(f"{prefix}step", torch.zeros((), dtype=torch.long))
