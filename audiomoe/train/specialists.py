"""UniMoE-Audio stage 2: build the MoE model from N dense specialists of the same architecture.

The specialist is the recipe's model with a *dense* FFN in every block: the same backbone with an
MoE layer of one expert, no null and no shared experts, and a one-column top-1 router (its softmax
is exactly 1, so the block computes ``FFN(x)``: a dense Transformer block), the expert
``slices`` times as wide as a routed expert (:func:`dense_overrides`, e.g. for ``tiny-unimoe``
with 8 experts of width 32 from 4 specialists: ``backbone.moe.num_experts=1
backbone.moe.num_null=0 backbone.moe.num_shared=0 backbone.moe.router=top_k
backbone.moe.router.k=1 backbone.moe.expert.d_ff=64``).

:func:`build_from_specialists` then sets, in place on the MoE model (``E`` routed experts, ``N``
specialists, ``S = E / N`` slices each, routed width ``F``):

- routed expert ``e`` of every layer = slice ``e % S`` (rows ``[j F, (j+1) F)`` of the gate and up
  projections, the same columns of the down projection) of specialist ``e // S``'s FFN;
- every other tensor the specialists share with the model (attention, norms, encoder, adapter)
  = the mean over the specialists; heads = the specialist whose data held the task
  (``heads="owner"``; several or none: the mean) or the mean (``heads="average"``);
- gates (routers, the shared gate) and shared experts keep the MoE model's fresh initialisation.

Averaging only keeps what the specialists learned when they are near each other: UniMoE-Audio's all
start from one pretrained model, here a recipe's ``foundation`` stage (:mod:`audiomoe.train.stages`).
The same function upcycles one dense model (listed once per copy the MoE needs: copied, not averaged).

A ``causal_lm`` backbone with a ``moe`` block (UniMoE-Audio's own case: a Qwen2-style LM upcycled)
works the same way: its dense specialist is the LM upcycled into one expert as wide as the slices
(the LM's MLPs sliced to that width), so the specialists' FFNs are sliced into the routed experts
and the LM's attention, norms (and frozen embeddings) are averaged. For dense checkpoints trained
elsewhere, :func:`audiomoe.backbones.upcycle.upcycle_causal_lm` takes them directly (``sources=``,
``average_non_mlp=True``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from audiomoe.core.errors import AudioMoEError
from audiomoe.core.interfaces import MoE


def moe_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module path: MoE layer}`` whose routed experts are stacked SwiGLU weights."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            ex = getattr(m, "experts", None)
            if ex is None or not hasattr(ex, "gate_up_proj") or not hasattr(ex, "down_proj"):
                raise AudioMoEError(
                    f"{name}: from_specialists needs grouped SwiGLU experts (moe.expert=swiglu); "
                    f"this layer has {type(ex).__name__}"
                )
            out[name] = m
    return out


def dense_overrides(spec: dict[str, Any], num_specialists: int) -> list[str]:
    """Overrides that turn the MoE spec ``spec`` into its dense specialist (see the module doc)."""
    bb = spec.get("backbone") or {}
    bp = (bb.get("params") or {}) if isinstance(bb, dict) else {}
    moe = bp.get("moe")
    if not isinstance(moe, dict) or bb.get("name") not in ("moe_transformer", "unimoe_transformer", "causal_lm"):
        raise AudioMoEError(
            "automatic specialists need a moe_transformer / unimoe_transformer backbone or a causal_lm "
            "backbone with a moe block; give the dense variant as specialists.overrides (model --set keys)"
        )
    p = moe.get("params") or {}
    experts = int(p.get("num_experts", 4))
    expert = p.get("expert") or {}
    if (expert.get("name") or "swiglu") != "swiglu":
        raise AudioMoEError("from_specialists slices SwiGLU experts: set backbone.moe.expert=swiglu")
    if experts % num_specialists:
        raise AudioMoEError(
            f"{experts} routed experts cannot be split evenly over {num_specialists} specialists; "
            "use a number of specialists that divides backbone.moe.num_experts"
        )
    d_ff = (expert.get("params") or {}).get("d_ff")
    if d_ff is None and bb.get("name") == "causal_lm":  # upcycling's default width: the LM's own, or its E-th slice
        inter = (bp.get("config") or {}).get("intermediate_size")
        if inter is None:
            raise AudioMoEError(
                "a causal_lm specialist's FFN width comes from backbone.moe.expert.d_ff: set it (the routed width)"
            )
        d_ff = int(inter) // experts if bp.get("moe_init") == "slice" else int(inter)
    d_ff = int(d_ff or 4 * int(spec.get("d_model", 256)))
    width = d_ff * (experts // num_specialists)
    return [
        "backbone.moe.num_experts=1",
        "backbone.moe.num_null=0",
        "backbone.moe.num_shared=0",
        "backbone.moe.router=top_k",
        "backbone.moe.router.k=1",
        f"backbone.moe.expert.d_ff={width}",
    ]


@torch.no_grad()
def build_from_specialists(
    model: nn.Module,
    specialists: Sequence[nn.Module],
    *,
    heads: str = "owner",
    owners: Optional[Sequence[Sequence[str]]] = None,
) -> dict[str, Any]:
    """Set ``model``'s weights from dense ``specialists`` (module doc); return what came from where."""
    n = len(specialists)
    layers = moe_layers(model)
    if not layers:
        raise AudioMoEError("from_specialists builds MoE layers, but this model has none")
    sp_states = [dict(s.state_dict()) for s in specialists]
    fresh: set[str] = set()
    done: set[str] = set()
    for path, layer in layers.items():
        e, f = layer.experts.num_experts, layer.experts.d_ff
        if e % n:
            raise AudioMoEError(f"{path}: {e} routed experts cannot be split evenly over {n} specialists")
        slices = e // n
        gu, dp = f"{path}.experts.gate_up_proj", f"{path}.experts.down_proj"
        for i, st in enumerate(sp_states):
            if gu not in st or st[gu].shape[0] != 1:
                raise AudioMoEError(
                    f"specialist {i} has no dense FFN '{gu}' (one expert): train the specialists with "
                    "the dense overrides (specialists.py: dense_overrides)"
                )
            if st[gu].shape[1] != 2 * f * slices:
                raise AudioMoEError(
                    f"specialist {i}: FFN width {st[gu].shape[1] // 2} at '{path}' is not {slices} slices x {f} "
                    f"(the routed expert width); set its expert d_ff to {f * slices}"
                )
        for ex in range(e):
            src, j = sp_states[ex // slices], ex % slices
            dense_gu, dense_dp = src[gu][0], src[dp][0]
            full = dense_gu.shape[0] // 2
            rows = torch.arange(j * f, (j + 1) * f)
            layer.experts.gate_up_proj[ex].copy_(torch.cat([dense_gu[rows], dense_gu[full + rows]]))
            layer.experts.down_proj[ex].copy_(dense_dp[:, rows])
        done |= {gu, dp}
        # routers (and their schedule positions), shared experts and shared gate stay fresh
        fresh |= {f"{path}.{k}" for k in layer.state_dict()} - done
    own = model.state_dict()
    distinct = [sp_states[i] for i, s in enumerate(specialists) if all(s is not o for o in specialists[:i])]
    averaged, owned, kept = [], {}, sorted(fresh)
    tasks = list(getattr(model, "task_names", []))
    for name, t in own.items():
        if name in fresh or name in done:
            continue
        if not all(name in st and st[name].shape == t.shape for st in sp_states):
            kept.append(name)
            continue
        head = next((tk for tk in tasks if name.startswith(f"heads.{tk}.")), None)
        srcs = distinct  # an upcycled model lists one dense model several times: copied, not averaged
        if head is not None and heads == "owner" and owners is not None:
            who = [i for i, o in enumerate(owners) if head in o]
            if len(who) == 1:
                srcs, owned[head] = [sp_states[who[0]]], who[0]
        if not t.is_floating_point():  # integer buffers (schedule positions): the first specialist's
            t.copy_(srcs[0][name])
            continue
        t.copy_(torch.stack([s[name].to(t.dtype) for s in srcs]).mean(0))
        averaged.append(name)
    return {"specialists": n, "moe_layers": list(layers), "averaged": len(averaged), "fresh": kept, "heads_from": owned}
