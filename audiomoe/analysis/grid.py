"""Grid expansion: ``--grid KEY=V1,V2`` and ``--variant NAME=K=V;K=V`` -> configs -> one run per config x seed.

A grid key is any ``--set`` key: a component name swaps the component (``backbone.moe.router=top_k,top_p``),
anything else sets a knob (``backbone.moe.router.p=0.5,0.7``). Values are split at commas outside
brackets, so ``tasks.x.labels=[a,b],[c,d]`` is two values. A variant bundles several overrides under
one name. Configs are the product variants x grid values (no variant: one implicit ``default``);
each gets a name from its variant and grid values (``top_p+p=0.5``) and a directory name safe on
any filesystem. A run is a config at one seed; its directory is ``runs/<config dir>/seed-<n>``.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from audiomoe.core.errors import AudioMoEError, did_you_mean

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")
# nproc / expert_parallel make each run itself distributed (audiomoe train starts torchrun's launcher)
TRAIN_OPTIONS = (
    "batch_size",
    "lr",
    "weight_decay",
    "schedule",
    "warmup",
    "grad_clip",
    "eval_every",
    "eval_batches",
    "data",
    "log_every",
    "save_every",
    "keep",
    "nproc",
    "expert_parallel",
)


@dataclass(frozen=True)
class Config:
    """One point of a study: what to train (``target``: preset, spec YAML or recipe) with which overrides.

    ``labels`` are the grid values that distinguish it (for tables); ``train`` extra ``audiomoe train``
    options (``{"lr": 0.01}``); ``steps`` None lets a recipe decide; ``arm`` the study arm it belongs to.
    """

    name: str
    target: str
    overrides: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    train: tuple[tuple[str, Any], ...] = ()
    steps: Optional[int] = None
    arm: str = ""

    @property
    def dirname(self) -> str:
        """A filesystem-safe directory name, unique per config name."""
        safe = _SAFE.sub("_", self.name)
        if safe != self.name or len(safe) > 80:
            safe = safe[:64] + "-" + hashlib.sha1(self.name.encode()).hexdigest()[:8]
        return safe


@dataclass(frozen=True)
class Run:
    """One config trained at one seed, in its own directory."""

    config: Config
    seed: int
    path: Path

    @property
    def label(self) -> str:
        """``config seed N`` for progress lines."""
        return f"{self.config.name} seed {self.seed}"


def split_values(text: str) -> list[str]:
    """Split ``text`` at commas outside brackets/braces/parentheses and quotes; strip each part."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def parse_grid(text: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2`` -> ``(KEY, [V1, V2])``; a clear error for a missing ``=``, key or value."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise AudioMoEError(f"--grid '{text}' must be KEY=V1,V2,... (e.g. backbone.moe.router=top_k,top_p)")
    vals = split_values(values)
    if not values.strip() or any(v == "" for v in vals):
        raise AudioMoEError(f"--grid '{text}': every value must be non-empty (e.g. {key}=a,b); got {vals}")
    if len(set(vals)) != len(vals):
        raise AudioMoEError(f"--grid '{text}' lists a value twice; give each value once")
    return key, vals


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=K=V;K=V`` -> ``(NAME, ["K=V", "K=V"])``; ``NAME=`` is a variant with no overrides (the target as is)."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not NAME_RE.match(name):
        raise AudioMoEError(
            f"--variant '{text}' must be NAME=KEY=VALUE;KEY=VALUE with NAME of letters, digits, '_', '.', '-' "
            "(e.g. naive=backbone.moe.router=top_k;backbone.moe.num_null=0)"
        )
    overrides = [o.strip() for o in rest.split(";") if o.strip()]
    bad = [o for o in overrides if "=" not in o or not o.partition("=")[0].strip()]
    if bad:
        raise AudioMoEError(f"--variant '{name}': {bad} are not KEY=VALUE overrides; separate overrides with ';'")
    return name, overrides


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """The last dotted component of each key, or the whole key where two keys share it."""
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (t if tails.count(t) == 1 else k) for k, t in zip(keys, tails)}


def train_options(options: Mapping[str, Any], where: str) -> tuple[tuple[str, Any], ...]:
    """Check ``{option: value}`` against the ``audiomoe train`` options the runner passes through."""
    bad = [k for k in options if k not in TRAIN_OPTIONS]
    if bad:
        hint = did_you_mean(bad[0], TRAIN_OPTIONS)
        raise AudioMoEError(f"{where}: unknown training option(s) {bad}; known: {', '.join(TRAIN_OPTIONS)}.{hint}")
    return tuple(sorted(options.items()))


def expand(
    target: str,
    grids: Sequence[tuple[str, Sequence[str]]] = (),
    variants: Sequence[tuple[str, Sequence[str]]] = (),
    *,
    overrides: Sequence[str] = (),
    train: Mapping[str, Any] | None = None,
    steps: Optional[int] = None,
    arm: str = "",
    variant_targets: Mapping[str, str] | None = None,
) -> list[Config]:
    """Configs for variants x grid product; ``overrides`` apply to all (before the variant's and the grid's)."""
    keys = [k for k, _ in grids]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise AudioMoEError(f"--grid names {dup} more than once; give all values of a key in one --grid KEY=V1,V2")
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise AudioMoEError(f"variant names must be unique, got {names}")
    short = _short_keys(keys)
    train_t = train_options(train or {}, "train options")
    out = []
    for (vname, vover), combo in itertools.product(
        list(variants) or [("", ())], itertools.product(*[v for _, v in grids])
    ):
        labels = tuple((short[k], v) for k, v in zip(keys, combo))
        parts = ([vname] if vname else []) + [f"{k}={v}" for k, v in labels]
        name = "+".join(parts) or "default"
        sets = tuple(overrides) + tuple(vover) + tuple(f"{k}={v}" for k, v in zip(keys, combo))
        tgt = (variant_targets or {}).get(vname, target)
        out.append(Config(name, tgt, sets, labels, train_t, steps, arm))
    return out


def plan_runs(configs: Sequence[Config], seeds: Sequence[int], root: str | Path) -> list[Run]:
    """Every config x seed as a :class:`Run` under ``root/runs``; config names and directories must be unique."""
    if not seeds:
        raise AudioMoEError("give at least one seed (--seeds N runs seeds 0..N-1)")
    names = [c.name for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AudioMoEError(f"two configs share the name(s) {dup}; rename a variant so every config is unique")
    dirs = [c.dirname for c in configs]
    if len(set(dirs)) != len(dirs):  # pragma: no cover - the hash suffix makes this practically impossible
        raise AudioMoEError(f"config directory names collide: {dirs}")
    base = Path(root) / "runs"
    return [Run(c, int(s), base / c.dirname / f"seed-{int(s)}") for c in configs for s in seeds]


@dataclass
class Plan:
    """What an ablation runs: configs, seeds, baseline per arm, and the arms skipped (with why)."""

    configs: list[Config]
    seeds: list[int]
    baselines: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    metric: str = "mean/accuracy"
    measure_batches: int = 4
    skipped_configs: dict[str, str] = field(default_factory=dict)  # variant name -> its skipped arm
    arm_seeds: dict[str, list[int]] = field(default_factory=dict)  # an arm's own seeds (a study's ``arms.X.seeds``)
    task_groups: dict[str, list[str]] = field(default_factory=dict)  # name -> tasks: a ``<name>/<metric>`` column
    config_seeds: dict[str, list[int]] = field(default_factory=dict)  # a variant's own seeds (``seeds:`` in a variant)

    def seeds_of(self, arm: str, config: str = "") -> list[int]:
        """The seeds a config runs: its own, else its arm's, else the plan's."""
        return self.config_seeds.get(config) or self.arm_seeds.get(arm, self.seeds)

    def seeds_text(self) -> str:
        """``4 seeds`` or, when arms or configs differ, ``4-8 seeds (routing 4-8, encoders 4)``."""
        counts: dict[str, list[int]] = {}
        for c in self.configs:
            counts.setdefault(c.arm, []).append(len(self.seeds_of(c.arm, c.name)))
        if not counts:
            counts = {"": [len(self.seeds)]}
        lo = min(min(v) for v in counts.values())
        hi = max(max(v) for v in counts.values())
        if lo == hi:
            return f"{lo} seed{'s' * (lo != 1)}"
        span = {a: f"{min(v)}" if min(v) == max(v) else f"{min(v)}-{max(v)}" for a, v in counts.items()}
        return f"{lo}-{hi} seeds ({', '.join(f'{a} {n}' for a, n in span.items())})"

    def arm_of(self) -> dict[str, str]:
        """Every config name (run or skipped) -> its arm."""
        return {**self.skipped_configs, **{c.name: c.arm for c in self.configs}}

    def runs(self, root: str | Path) -> list[Run]:
        """All runs of the plan under ``root``."""
        return [r for c in self.configs for r in plan_runs([c], self.seeds_of(c.arm, c.name), root)]
