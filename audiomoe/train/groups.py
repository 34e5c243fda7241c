"""Named parameter groups: what a stage's ``train:`` / ``freeze:`` and ``optim.lr_mult`` refer to.

Groups are found by module *type* where one exists (so a plugin's router or MoE layer is found
too), else by the attribute names the composed model has:

- ``all``; ``encoder`` (everything under ``model.encoder``); ``encoder.base`` / ``encoder.weak``
  (a MoWE mixture's strong base encoder / weak pool); ``fusion`` (every :class:`Fusion` module,
  its routers included, plus a mixture's weak projections ``encoder.proj``);
- ``router``: every :class:`Router` module anywhere (MoE gates, MoWE encoder routers) plus the MoE
  layers' ``shared_gate`` (UniMoE-Audio's one gate also scores the shared experts);
- ``experts`` / ``shared_experts``: the routed / shared experts of every :class:`MoE` layer;
- ``adapter``; ``backbone``; ``lora`` (tensors named ``lora_*``); ``heads``; ``heads.<task>``.

Anything else is a glob over parameter names (``backbone.blocks.*.attn``): it matches a tensor
named like it or lying under a module named like it. A name or glob matching nothing is an error
that lists the groups this model has.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Sequence

from torch import nn

from audiomoe.core.errors import AudioMoEError, did_you_mean
from audiomoe.core.interfaces import Fusion, MoE, Router


def _under(model: nn.Module, prefixes: Iterable[str]) -> set[str]:
    """Parameter names of ``model`` at or under any of the module paths ``prefixes``."""
    prefixes = [p for p in prefixes if p is not None]
    out = set()
    for name, _ in model.named_parameters():
        if any(p == "" or name == p or name.startswith(p + ".") for p in prefixes):
            out.add(name)
    return out


def _paths(model: nn.Module, cls: type) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def named_groups(model: nn.Module) -> dict[str, set[str]]:
    """Every group name this model has (non-empty ones only) -> the parameter names in it."""
    mods = dict(model.named_modules())
    groups: dict[str, set[str]] = {"all": _under(model, [""])}
    if "encoder" in mods:
        groups["encoder"] = _under(model, ["encoder"])
        groups["encoder.base"] = _under(model, ["encoder.base"]) if "encoder.base" in mods else set()
        groups["encoder.weak"] = _under(model, ["encoder.weak"]) if "encoder.weak" in mods else set()
    proj = ["encoder.proj"] if "encoder.proj" in mods and "encoder.weak" in mods else []
    groups["fusion"] = _under(model, _paths(model, Fusion) + proj)
    moe = _paths(model, MoE)
    groups["router"] = _under(model, _paths(model, Router) + [f"{p}.shared_gate".lstrip(".") for p in moe])
    groups["experts"] = _under(model, [f"{p}.experts".lstrip(".") for p in moe])
    groups["shared_experts"] = _under(model, [f"{p}.shared".lstrip(".") for p in moe])
    for name in ("adapter", "backbone", "heads"):
        groups[name] = _under(model, [name]) if name in mods else set()
    groups["lora"] = {n for n, _ in model.named_parameters() if "lora_" in n}
    heads = getattr(model, "heads", None)
    for key in heads.keys() if heads is not None else []:
        groups[f"heads.{key}"] = _under(model, [f"heads.{key}"])
    for task in getattr(model, "task_names", []):  # a task served by a shared head: that head's parameters
        groups.setdefault(f"heads.{task}", groups.get(f"heads.{getattr(heads, 'head_of', {}).get(task, task)}", set()))
    return {k: v for k, v in groups.items() if v}


def resolve_group(model: nn.Module, name: str, where: str, groups: dict[str, set[str]] | None = None) -> set[str]:
    """The parameter names ``name`` (a group or a glob) selects; an error naming the groups when none."""
    groups = named_groups(model) if groups is None else groups
    if name in groups:
        return groups[name]
    params = [n for n, _ in model.named_parameters()]
    if any(c in name for c in "*?["):
        hit = {n for n in params if fnmatch.fnmatchcase(n, name) or fnmatch.fnmatchcase(n, name + ".*")}
    else:
        hit = {n for n in params if n == name or n.startswith(name + ".")}
    if not hit:
        known = [
            "all",
            "encoder",
            "encoder.base",
            "encoder.weak",
            "fusion",
            "router",
            "experts",
            "shared_experts",
            "adapter",
            "backbone",
            "lora",
            "heads",
        ] + [f"heads.{t}" for t in getattr(model, "task_names", [])]
        absent = [g for g in known if g not in groups]
        raise AudioMoEError(
            f"{where}: '{name}' matches no parameter of this model.{did_you_mean(name, list(groups))} "
            f"Groups this model has: {', '.join(groups)}"
            + (f" (it has no {', '.join(absent)})" if absent else "")
            + "; or give a glob over parameter names, e.g. 'backbone.blocks.*.attn'"
        )
    return hit


def select(model: nn.Module, names: Sequence[str], where: str) -> set[str]:
    """Union of the parameter names that ``names`` select."""
    groups = named_groups(model)
    out: set[str] = set()
    for i, name in enumerate(names):
        out |= resolve_group(model, name, f"{where}.{i}", groups)
    return out


def trainable_names(
    model: nn.Module, train: Sequence[str], freeze: Sequence[str], built: set[str], where: str
) -> set[str]:
    """Tensors a stage trains: ``train`` minus ``freeze``, within those the model built as trainable.

    ``built`` are the names with ``requires_grad`` when the model was composed: a component that
    freezes its own weights (``freeze: true``, the LM under LoRA) keeps them frozen. A stage that
    would train nothing is an error.
    """
    chosen = select(model, train, f"{where}.train") - select(model, freeze, f"{where}.freeze")
    out = chosen & built
    if not out:
        held = f" ({len(chosen)} selected tensors are frozen by their components' own params)" if chosen else ""
        raise AudioMoEError(f"{where}: the stage trains no parameter{held}; change its train/freeze lists")
    return out


def apply_trainable(model: nn.Module, names: set[str]) -> None:
    """Set ``requires_grad`` to exactly ``names`` (the others are frozen for the stage)."""
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def lr_multipliers(model: nn.Module, lr_mult: dict[str, float], where: str) -> dict[str, float]:
    """Per parameter name, its lr multiplier: the last entry of ``lr_mult`` that selects it (default 1)."""
    groups = named_groups(model)
    out = {n: 1.0 for n, _ in model.named_parameters()}
    for key, mult in lr_mult.items():
        for n in resolve_group(model, key, f"{where}.lr_mult.{key}", groups):
            out[n] = float(mult)
    return out
