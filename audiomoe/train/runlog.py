"""Run logs: ``log.jsonl`` (one JSON object per logged step), TensorBoard events, routing statistics, health warnings.

Rank 0 writes; other ranks hold a :class:`RunLog` that does nothing. A record is
``{"step", "stage", "stage_step", "loss", "losses": {...}, "lr", "grad_norm", "time": {data,
forward, backward, optimizer, step}, "items", "skipped", "skipped_steps"}`` (a step whose gradient
norm was NaN/inf under ``optim.on_nonfinite: skip`` is always logged, with ``skipped: true`` and
``grad_norm: null``); evaluations add ``{"step", "eval": {...}}``,
routing reports ``{"step", "routing": {layer: {...}}}`` and warnings ``{"step", "warning": ...}``.
On resume, records after the resumed step are dropped (the file is rewritten atomically) and the
TensorBoard writer is opened with ``purge_step`` so the event view has no duplicate steps either.

Routing statistics (every ``log.routing_every`` steps, from ``ModelOutput.routing``; each value an
:class:`audiomoe.core.interfaces.Routing`) per layer: ``load_max_over_mean`` and ``experts_per_token``
(its ``summary()``), ``null_share`` (share of picks on null columns), ``top_prob`` (mean top router
probability), ``load`` (share per column, accumulated over the steps since the last report) and
``per_task`` (share per column for each task). Health: a column unused for ``unused_steps``
steps, one column above ``max_load_share`` of the load, and a router whose mean top probability
stays within ``uniform_tolerance`` of ``1/E`` for ``uniform_checks`` reports are warned once each.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from audiomoe.train.recipe import HealthSpec, LogSpec

LOG_FILE = "log.jsonl"
TB_DIR = "tb"


def truncate_log(path: Path, step: int) -> None:
    """Keep only records of ``path`` up to ``step`` (a resumed run rewrites what followed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)


class RoutingMonitor:
    """Accumulates per-layer loads every step; reports statistics and health warnings every N steps."""

    def __init__(self, health: HealthSpec) -> None:
        self.health = health
        self.load: dict[str, torch.Tensor] = {}
        self.idle: dict[str, torch.Tensor] = {}  # steps since each column last got an item
        self.uniform_run: dict[str, int] = {}
        self.warned: set[tuple[str, str, int]] = set()

    def update(self, routing: dict[str, Any]) -> None:
        """Add one step's loads (cheap: one small tensor add per layer, no device sync)."""
        for name, r in routing.items():
            counts = r.counts.detach().float()
            self.load[name] = counts if name not in self.load else self.load[name] + counts
            idle = self.idle.get(name, torch.zeros_like(counts))
            self.idle[name] = torch.where(counts > 0, torch.zeros_like(idle), idle + 1)

    def report(
        self, routing: dict[str, Any], tasks: Mapping[str, Sequence[str]], task_names: Sequence[str]
    ) -> tuple[dict[str, Any], list[str]]:
        """``({layer: statistics}, new warnings)`` from the last step's routing and the accumulated loads.

        ``tasks``: per layer, the task of each of its samples (``ModelOutput.routing_tasks``).
        """
        h, stats, warns = self.health, {}, []
        for name, r in routing.items():
            s = {k: round(v, 5) for k, v in r.summary().items()}
            s["experts_per_token"] = s.pop("columns_per_item", 0.0)
            valid = (
                r.item_mask
                if r.item_mask is not None
                else torch.ones(r.mask.shape[0], dtype=torch.bool, device=r.mask.device)
            )
            mask, e = r.mask[valid], r.num_columns
            picks = mask.sum().clamp_min(1)
            s["null_share"] = round(float(mask[:, e - r.null_columns :].sum() / picks), 5) if r.null_columns else 0.0
            probs = torch.softmax(r.logits.detach().float()[valid], -1)
            top = float(probs.max(-1).values.mean()) if probs.numel() else 0.0
            s["top_prob"] = round(top, 5)
            load = self.load.get(name, r.counts.detach().float())
            share = (load / load.sum().clamp_min(1e-9)).cpu()
            s["load"] = [round(float(x), 4) for x in share]
            s["per_task"] = _per_task(r, tasks.get(name, ()), task_names)
            stats[name] = s
            real = e - r.null_columns
            idle = self.idle.get(name)
            if idle is not None:
                for c in (idle[:real] >= h.unused_steps).nonzero().flatten().tolist():
                    warns += self._once(name, "unused", c, f"{name}: expert {c} got no token for {int(idle[c])} steps")
            if real > 1 and float(share[:real].max()) > h.max_load_share:
                c = int(share[:real].argmax())
                warns += self._once(
                    name,
                    "overload",
                    c,
                    f"{name}: expert {c} takes {float(share[c]):.0%} of the load (over {h.max_load_share:.0%})",
                )
            near = e > 1 and abs(top - 1.0 / e) <= h.uniform_tolerance
            self.uniform_run[name] = self.uniform_run.get(name, 0) + 1 if near else 0
            if self.uniform_run[name] >= h.uniform_checks:
                warns += self._once(
                    name,
                    "uniform",
                    -1,
                    f"{name}: router stuck at uniform (mean top probability {top:.3f}, 1/E = {1 / e:.3f})",
                )
        self.load.clear()
        return stats, warns

    def _once(self, layer: str, kind: str, col: int, text: str) -> list[str]:
        key = (layer, kind, col)
        if key in self.warned:
            return []
        self.warned.add(key)
        return [text]


def _per_task(r: Any, tasks: Sequence[str], task_names: Sequence[str]) -> dict[str, list[float]]:
    """Share of picks per column for each task present (items map back to samples via ``item_shape``)."""
    shape = r.item_shape or (r.mask.shape[0],)
    b = shape[0]
    if b != len(tasks) or r.mask.shape[0] % max(b, 1):
        return {}
    per = r.mask.shape[0] // b
    sample = torch.arange(r.mask.shape[0], device=r.mask.device) // per
    valid = r.item_mask if r.item_mask is not None else torch.ones_like(sample, dtype=torch.bool)
    out = {}
    for t in task_names:
        idx = torch.tensor([i for i, x in enumerate(tasks) if x == t], device=r.mask.device)
        if not idx.numel():
            continue
        keep = torch.isin(sample, idx) & valid
        m = r.mask[keep].float().sum(0)
        out[t] = [round(float(x), 4) for x in (m / m.sum().clamp_min(1)).cpu()]
    return out


class RunLog:
    """Writes the run's logs (rank 0 only; on other ranks, and with no run directory, every call is a no-op)."""

    def __init__(self, root: Optional[Path], spec: LogSpec, start_step: int, active: bool = True) -> None:
        self.spec, self.active = spec, active and root is not None
        self.root, self._fh, self.tb = root, None, None
        self.warnings: list[dict[str, Any]] = []
        if not self.active:
            return
        assert root is not None
        if spec.jsonl:
            truncate_log(root / LOG_FILE, start_step)
            self._fh = open(root / LOG_FILE, "a", encoding="utf-8")
        if spec.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is a dependency; a broken install must not stop training
                warnings.warn(
                    "TensorBoard logging is off: the 'tensorboard' package cannot be imported (pip install tensorboard)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                self.tb = SummaryWriter(str(root / TB_DIR), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict[str, Any]) -> None:
        """Append one JSON record (flushed: a killed run keeps what it logged)."""
        if self._fh is not None:
            self._fh.write(json.dumps(record, default=float) + "\n")
            self._fh.flush()

    def step(self, record: dict[str, Any]) -> None:
        """Log one training step: JSON line + scalars."""
        if not self.active:
            return
        self.write(record)
        if self.tb is not None:
            s = record["step"]
            self.tb.add_scalar("train/loss", record["loss"], s)
            for k, v in record.get("losses", {}).items():
                self.tb.add_scalar(f"train/{k}", v, s)
            for k in ("lr", "grad_norm"):
                if record.get(k) is not None:  # a skipped step has no usable norm
                    self.tb.add_scalar(f"train/{k}", record[k], s)
            for k, v in record.get("time", {}).items():
                self.tb.add_scalar(f"time/{k}", v, s)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        """Log evaluation metrics."""
        if not self.active:
            return
        self.write({"step": step, "eval": metrics})
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"eval/{k}", v, step)

    def routing(self, step: int, stats: dict[str, Any], warns: list[str]) -> None:
        """Log routing statistics per layer and any new health warnings."""
        if not self.active:
            return
        self.write({"step": step, "routing": stats})
        if self.tb is not None:
            for layer, s in stats.items():
                for k in ("load_max_over_mean", "experts_per_token", "null_share", "top_prob"):
                    self.tb.add_scalar(f"routing/{layer}/{k}", s[k], step)
        for w in warns:
            self.warnings.append({"step": step, "warning": w})
            self.write({"step": step, "warning": w})

    def warning(self, step: int, text: str) -> None:
        """Log a training warning (zero gradients, a skipped step) as a ``{"step", "warning"}`` record."""
        if self.active:
            self.write({"step": step, "warning": text})

    def close(self) -> None:
        """Flush and close the files."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
