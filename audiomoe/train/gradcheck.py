"""Numeric health of a training step: non-finite gradients and tensors, and trainable tensors that never get a gradient.

- :func:`first_nonfinite_grad` names the first parameter whose gradient holds NaN or inf (the
  step loop calls it only once the global gradient norm is non-finite: it costs a sync per tensor).
- :func:`first_nonfinite` names the first floating tensor of a state dict holding NaN or inf
  (a checkpoint with one is never written, and never resumed from).
- :class:`ZeroGradWatch`: a trainable tensor whose gradient is ``None`` or exactly zero in every
  one of the first :data:`ZERO_GRAD_STEPS` optimizer steps of a stage does not train (a plugin
  router or expert whose output never reaches the loss). A head's tensors only count the steps
  whose batches held its task, a routed expert's the steps it got tokens in.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Mapping, Optional

import torch

from audiomoe.train.groups import named_groups

#: optimizer steps at a stage's start in which a trainable tensor's gradient must be non-zero at least once
ZERO_GRAD_STEPS = 3
_SHOWN = 5  # tensors named in the warning; the rest are counted
# a routed part: one expert of an MoE layer, one weak encoder of a mixture with its projection (groups.py's groups)
_UNIT_RE = re.compile(r"^(.*?(?:^|\.)experts\.\d+|encoder\.(?:weak|proj)\.\d+)\.")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (an FSDP DTensor's shard; a plain tensor itself)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def first_nonfinite_grad(named: Iterable[tuple[str, torch.nn.Parameter]]) -> Optional[str]:
    """The name of the first parameter (in ``named`` order) whose gradient holds NaN or inf on this rank, else None."""
    for name, p in named:
        if p.grad is not None and not bool(torch.isfinite(_local(p.grad.detach())).all()):
            return name
    return None


def first_nonfinite(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The key of the first floating tensor of ``state`` holding NaN or inf, else None."""
    for key, t in state.items():
        numeric = isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())
        if numeric and not bool(torch.isfinite(_local(t.detach())).all()):
            return key
    return None


class ZeroGradWatch:
    """Trainable tensors whose gradient stays ``None`` or exactly zero over a stage's first ``steps`` optimizer steps.

    ``named``: the stage's trainable ``(name, parameter)`` pairs (frozen tensors are never watched).
    A step counts for a head's tensor only when its task was in the batches, and for a routed
    expert's (or a mixture weak encoder's) only when that expert was routed to, i.e. some tensor of
    it got a gradient. Call :meth:`update` after each step's backward with the tasks its batches
    held; it returns the warning once, after the ``steps``-th call (None before and after).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        named: Iterable[tuple[str, torch.nn.Parameter]],
        stage: str,
        steps: int = ZERO_GRAD_STEPS,
    ) -> None:
        self.stage, self.steps, self.left = stage, steps, steps
        # no gradient by construction (a key bias under softmax, LoRA's A while B is 0): exempt, as in check_component
        exempt = [
            f"{path}.{g}" if path else g for path, m in model.named_modules() for g in getattr(m, "gradient_exempt", ())
        ]
        self.params = {n: p for n, p in named if not any(fnmatch.fnmatchcase(n, g) for g in exempt)}
        self.pending = set(self.params)
        self.counted = dict.fromkeys(self.params, 0)
        groups = named_groups(model)
        self.task_of = {n: g[len("heads.") :] for g, names in groups.items() if g.startswith("heads.") for n in names}
        self.unit_of: dict[str, str] = {}
        proj = {n for n in groups.get("fusion", set()) if n.startswith("encoder.proj.")}
        for n in groups.get("experts", set()) | groups.get("encoder.weak", set()) | proj:
            m = _UNIT_RE.match(n)
            if m and n in self.params:
                self.unit_of[n] = m.group(1).replace("encoder.proj.", "encoder.weak.")
        self.units: dict[str, list[str]] = {}
        for n, u in self.unit_of.items():
            self.units.setdefault(u, []).append(n)

    def update(self, tasks: set[str]) -> Optional[str]:
        """Record one optimizer step (its gradients, before clipping); the warning after the last watched step."""
        if self.left <= 0:
            return None
        need = self.pending | {m for n in self.pending if n in self.unit_of for m in self.units[self.unit_of[n]]}
        names = [n for n in need if self.params[n].grad is not None]
        moved: set[str] = set()
        if names:  # one device sync for every tensor
            flags = torch.stack([_local(self.params[n].grad.detach()).ne(0).any() for n in names]).tolist()
            moved = {n for n, f in zip(names, flags) if f}
        active = {self.unit_of[n] for n in moved if n in self.unit_of}
        for n in sorted(self.pending):
            task, unit = self.task_of.get(n), self.unit_of.get(n)
            if (task is not None and task not in tasks) or (unit is not None and unit not in active):
                continue  # its head had no item, its expert no token: no gradient is expected in this step
            if n in moved:
                self.pending.discard(n)
            else:
                self.counted[n] += 1
        self.left -= 1
        if self.left:
            return None
        dead = [n for n in self.params if n in self.pending and self.counted[n] > 0]
        if not dead:
            return None
        shown = ", ".join(dead[:_SHOWN]) + (f" and {len(dead) - _SHOWN} more" if len(dead) > _SHOWN else "")
        return (
            f"{len(dead)} trainable tensor(s) got no gradient (none, or exactly zero) in each of the first "
            f"{self.steps} steps of stage '{self.stage}': {shown}. They do not train: their module's output does "
            "not reach the loss (audiomoe.testing.check_component finds this in a plugin), or freeze them in the "
            "stage's 'freeze'"
        )
