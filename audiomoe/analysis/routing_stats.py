"""Routing health from an eval pass: experts per token per layer, load per task, null share, weak-encoder picks, MoE FLOPs.

:class:`RoutingStats` accumulates :class:`audiomoe.analysis.trace.RoutingTrace` records of several batches
(``add``), keeping per layer and task the picks per column, the picks per item and the null picks:

- token layers (``backbone/layer<i>``, MoE FFNs): ``real_experts_per_token`` = routed experts a valid
  token ran (null picks excluded), ``null_share`` = null picks / all picks, ``load_by_task[t][e]`` =
  picks of column ``e`` by the tokens of task ``t``;
- sample layers (``encoder/mowe...``, the MoWE mixture's router(s)): ``selection_by_task[t][k]`` =
  share of task ``t``'s samples whose router picked weak encoder ``k``;
- every layer (:meth:`RoutingStats.add_confidence`): ``top_prob``, the mean over valid items of the
  router's largest softmax probability, beside ``uniform_prob`` = 1 / columns: a router whose
  ``top_prob`` is close to ``uniform_prob`` has learned no preference, so its picks (however
  lopsided per task) are decided by near-ties.

MoE FLOPs (:func:`moe_flop_hooks`): a forward hook on every MoE layer reads what it computed
(``last_stats``: valid tokens, routed (token, expert) pairs). A weight used once per token costs a
multiply and an add, so per layer ``FLOPs = 2 * (pairs * P_expert + tokens * (P_router + P_shared +
P_shared_gate))`` with ``P_expert`` one routed expert's parameters; null picks cost nothing (they are
never computed). Elementwise work (activations, softmax, weighting) is left out. Per audio second:
summed over layers and batches, divided by the valid audio seconds of those batches.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Optional, Sequence


class RoutingStats:
    """Per-layer, per-task routing counts over the batches given to :meth:`add`."""

    def __init__(self, column_labels: Optional[dict[str, list[str]]] = None) -> None:
        self.layers: dict[str, dict[str, Any]] = {}
        self.column_labels = column_labels or {}
        self.confidence: dict[str, list[float]] = {}  # layer -> [sum of top probabilities, items]
        self.confidence_by_task: dict[str, dict[str, list[float]]] = {}  # layer -> task -> [sum, items]

    def add(self, trace: Any, tasks: Sequence[str] | Mapping[str, Sequence[str]]) -> None:
        """Add one batch's trace; ``tasks``: the task of every sample, for all layers or per layer (``ModelOutput.routing_tasks``)."""
        import torch

        for name, lt in trace.layers.items():
            layer_tasks = tasks[name] if isinstance(tasks, Mapping) else tasks
            e = lt.num_columns
            rec = self.layers.setdefault(
                name,
                {
                    "kind": "token" if lt.ids.dim() == 3 else "sample",
                    "columns": e,
                    "null_columns": lt.null_columns,
                    "items": defaultdict(float),
                    "picks": defaultdict(float),
                    "null": defaultdict(float),
                    "load": defaultdict(lambda e=e: [0.0] * e),  # bound now: a later layer may have another width
                    "samples": defaultdict(float),
                    "selected": defaultdict(lambda e=e: [0.0] * e),
                },
            )
            for t in sorted(set(layer_tasks)):
                idx = torch.tensor([i for i, x in enumerate(layer_tasks) if x == t])
                ids, valid = lt.ids[idx], lt.valid[idx]
                picks = (ids >= 0) & valid[..., None]
                chosen = ids[picks]
                counts = torch.bincount(chosen, minlength=e).tolist() if chosen.numel() else [0] * e
                rec["items"][t] += float(valid.sum())
                rec["picks"][t] += float(picks.sum())
                rec["null"][t] += float((chosen >= e - lt.null_columns).sum()) if lt.null_columns else 0.0
                rec["load"][t] = [a + b for a, b in zip(rec["load"][t], counts)]
                if rec["kind"] == "sample":  # which weak encoders each sample's router picked
                    rec["samples"][t] += float(valid.sum())
                    hit = torch.zeros(e)
                    for k in range(e):
                        hit[k] = float(((ids == k) & valid[..., None]).any(-1).sum())
                    rec["selected"][t] = [a + float(b) for a, b in zip(rec["selected"][t], hit)]

    def add_confidence(self, routing: Any, tasks: Optional[Mapping[str, Sequence[str]]] = None) -> None:
        """Add one batch's router confidence: the top softmax probability of every valid item, per layer (``{name: Routing}``);
        with ``tasks`` (the task of every routed item, per layer) also per task (a per-sample router: one item per sample)."""
        import torch

        for name, r in routing.items():
            logits = getattr(r, "logits", None)
            if logits is None or name not in self.layers:
                continue
            top = torch.softmax(logits.detach().float(), -1).amax(-1).reshape(-1)
            mask = getattr(r, "item_mask", None)
            if mask is not None and mask.numel() == top.numel():
                top = top[mask.reshape(-1).bool()]
            acc = self.confidence.setdefault(name, [0.0, 0.0])
            acc[0] += float(top.sum())
            acc[1] += float(top.numel())
            item_tasks = (tasks or {}).get(name)
            if item_tasks is not None and len(item_tasks) == top.numel():
                per = self.confidence_by_task.setdefault(name, {})
                for t, v in zip(item_tasks, top.tolist()):
                    a = per.setdefault(t, [0.0, 0.0])
                    a[0], a[1] = a[0] + v, a[1] + 1.0

    def result(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-able statistics per layer (see the module doc for each field)."""
        out = {}
        for name, r in self.layers.items():
            tasks = sorted(r["items"])
            items = sum(r["items"].values())
            picks = sum(r["picks"].values())
            null = sum(r["null"].values())
            row: dict[str, Any] = {
                "kind": r["kind"],
                "columns": r["columns"],
                "null_columns": r["null_columns"],
                "column_labels": self.column_labels.get(name) or _labels(r["columns"], r["null_columns"], r["kind"]),
                "items": items,
                "experts_per_token": picks / max(items, 1.0),
                "real_experts_per_token": (picks - null) / max(items, 1.0),
                "null_share": null / max(picks, 1.0),
                "load_by_task": {t: r["load"][t] for t in tasks},
                "real_experts_per_token_by_task": {
                    t: (r["picks"][t] - r["null"][t]) / max(r["items"][t], 1.0) for t in tasks
                },
                "null_share_by_task": {t: r["null"][t] / max(r["picks"][t], 1.0) for t in tasks},
            }
            conf = self.confidence.get(name)
            if conf and conf[1]:
                row["top_prob"], row["uniform_prob"] = conf[0] / conf[1], 1.0 / max(r["columns"], 1)
            if self.confidence_by_task.get(name):
                row["top_prob_by_task"] = {
                    t: a[0] / a[1] for t, a in sorted(self.confidence_by_task[name].items()) if a[1]
                }
            if r["kind"] == "sample":
                row["selection_by_task"] = {t: [v / max(r["samples"][t], 1.0) for v in r["selected"][t]] for t in tasks}
            out[name] = row
        return out


def _labels(columns: int, null: int, kind: str) -> list[str]:
    if kind == "sample":
        return [f"weak{k}" for k in range(columns)]
    return [f"e{k}" for k in range(columns - null)] + [f"null{k}" for k in range(null)]


def weak_encoder_labels(model: Any) -> list[str]:
    """``weak0 whisper``, ``weak1 hubert``, ... for a MoWE mixture encoder (empty for any other encoder)."""
    weak = getattr(model.encoder, "weak", None)
    if weak is None:
        return []
    spec = (model.spec.get("encoder") or {}).get("params", {}).get("weak") or []
    names = [s.get("name", "?") if isinstance(s, dict) else "?" for s in spec]
    return [f"weak{k} {names[k] if k < len(names) else type(m).__name__}" for k, m in enumerate(weak)]


class MoEFlops:
    """Forward hooks on every MoE layer of a model, summing the FLOPs each forward computed (module doc)."""

    def __init__(self, model: Any) -> None:
        from audiomoe.core.interfaces import MoE

        self.layers: dict[str, dict[str, float]] = {}
        self._handles = []
        count = lambda m: 0 if m is None else sum(q.numel() for q in m.parameters())
        for path, module in model.named_modules():
            if not isinstance(module, MoE) or not hasattr(module, "experts"):
                continue
            experts = module.experts
            per_expert = (
                float(experts.num_expert_parameters())
                if hasattr(experts, "num_expert_parameters")
                else count(experts) / max(len(experts), 1)
            )
            fixed = (
                count(getattr(module, "router", None))
                + count(getattr(module, "shared", None))
                + count(getattr(module, "shared_gate", None))
            )
            self.layers[path] = {
                "expert_params": per_expert,
                "fixed_params": float(fixed),
                "tokens": 0.0,
                "pairs": 0.0,
                "flops": 0.0,
            }
            self._handles.append(module.register_forward_hook(self._hook(path)))

    def _hook(self, path: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            stats = getattr(module, "last_stats", None) or {}
            rec = self.layers[path]
            tokens, pairs = float(stats.get("tokens", 0)), float(stats.get("routed_pairs", 0))
            rec["tokens"] += tokens
            rec["pairs"] += pairs
            rec["flops"] += 2.0 * (pairs * rec["expert_params"] + tokens * rec["fixed_params"])

        return hook

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self, audio_seconds: float) -> dict[str, Any]:
        """Per layer and in total: MFLOPs per audio second, routed experts per token; plus the totals."""
        per = {}
        total = 0.0
        for path, r in self.layers.items():
            per[path] = {
                **r,
                "routed_per_token": r["pairs"] / max(r["tokens"], 1.0),
                "mflops_per_audio_s": r["flops"] / 1e6 / max(audio_seconds, 1e-9),
            }
            total += r["flops"]
        return {"moe_layers": per, "moe_mflops_per_audio_s": total / 1e6 / max(audio_seconds, 1e-9) if per else None}


def measure_model(model: Any, batches: Sequence[Any]) -> dict[str, Any]:
    """Run ``model`` (eval mode, no grad, teacher-forced) on ``batches``; routing stats, MoE FLOPs, measured active parameters."""
    import torch

    from audiomoe.analysis.trace import RoutingTrace
    from audiomoe.core.batch import AudioBatch
    from audiomoe.core.composer import count_parameters

    labels = weak_encoder_labels(model)
    # a head that writes through the shared decoder routes in the backbone's layers: its records are those layers'
    readers = [f"heads/{t}/decoder/" for t in model.task_names if getattr(model.heads[t], "reads_decoder", False)]
    shared_layer = lambda name: next((f"backbone/{name[len(r) :]}" for r in readers if name.startswith(r)), name)
    stats = RoutingStats()
    flops = MoEFlops(model)
    was = model.training
    model.eval()
    audio_s, active_sum, n_items = 0.0, 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                tasks = batch.task_list()
                # teacher-forced, as in training: a head that writes through the shared decoder (text, codec) routes its
                # sequence only in its loss pass, so the targets go in; autoregressive predictions are not needed
                out = model(
                    AudioBatch(
                        batch.waveforms, batch.sample_rate, batch.tasks, batch.lengths, batch.targets, batch.prompts
                    ),
                    predict=False,
                )
                trace, per_layer = RoutingTrace.from_routing(out.routing, len(tasks)), out.routing_tasks(tasks)
                for (
                    name,
                    layer,
                ) in trace.layers.items():  # one record at a time: several heads' passes may share a layer
                    shared = shared_layer(name)
                    stats.add(RoutingTrace({shared: layer}), {shared: per_layer[name]})
                    layer_tasks = per_layer[name] if isinstance(per_layer, Mapping) else per_layer
                    stats.add_confidence({shared: out.routing[name]}, {shared: layer_tasks})
                lengths = (
                    batch.lengths if batch.lengths is not None else torch.full((len(tasks),), batch.waveforms.shape[-1])
                )
                audio_s += float(lengths.sum()) / float(batch.sample_rate)
                active_sum += count_parameters(model)[1] * len(tasks)  # measured: what this batch's routing used
                n_items += len(tasks)
    finally:
        flops.remove()
        model.train(was)
    if labels:
        stats.column_labels = {
            n: labels for n, r in stats.layers.items() if r["kind"] == "sample" and r["columns"] == len(labels)
        }
    total = sum(p.numel() for p in model.parameters())
    return {
        "params_total": int(total),
        "params_active": active_sum / max(n_items, 1),
        "audio_seconds": audio_s,
        "items": n_items,
        "batches": len(batches),
        "tasks": list(model.task_names),
        "weak_encoders": labels,
        "routing": stats.result(),
        **flops.result(audio_s),
    }
