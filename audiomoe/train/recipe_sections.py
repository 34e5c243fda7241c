"""The recipe's section specs: ``optim`` (and a stage's override of it), ``schedule``, ``eval``, ``log`` (with its
routing ``health`` checks), ``checkpoint``, ``distributed`` and a stage's ``aux_weight``.

Split from :mod:`audiomoe.train.recipe` (which re-exports them); see there for the recipe as a whole.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from audiomoe.core.limits import MAX_LR, MAX_STEPS
from audiomoe.train.stage_specs import Strict as _Strict


class OptimSpec(_Strict):
    """AdamW (the only optimizer so far) with clipping, accumulation and per-group lr multipliers."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(3e-3, gt=0.0, le=MAX_LR, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    grad_clip: Optional[float] = Field(
        1.0, gt=0.0, description="clip the global gradient norm to this (null: no clipping)"
    )
    accumulation: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    lr_mult: dict[str, float] = Field(
        default_factory=dict, description="group name or glob -> lr multiplier (last match wins)"
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf gradient norm: stop naming the parameter, or skip that optimizer step (counted)"
    )

    @model_validator(mode="after")
    def _betas(self) -> "OptimSpec":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)} must lie in [0, 1)")
        if any(not 0.0 <= m <= 1000.0 for m in self.lr_mult.values()):
            raise ValueError("lr_mult values must lie in [0, 1000]")
        return self


class OptimOverride(_Strict):
    """A stage's changes to the recipe's ``optim`` (only the keys given, not null, change)."""

    lr: Optional[float] = Field(None, gt=0.0, le=MAX_LR)
    betas: Optional[tuple[float, float]] = None
    eps: Optional[float] = Field(None, gt=0.0, le=1.0)
    weight_decay: Optional[float] = Field(None, ge=0.0, le=1.0)
    grad_clip: Optional[float] = Field(None, gt=0.0)
    accumulation: Optional[int] = Field(None, ge=1, le=1024)
    lr_mult: Optional[dict[str, float]] = None


#: warmup share of a stage's steps when ``schedule.warmup`` is not given
AUTO_WARMUP = 0.05


class ScheduleSpec(_Strict):
    """Learning-rate schedule over a stage: linear warmup, then constant / linear / cosine decay.

    The defaults train: warmup over 5% of the stage's steps, cosine decay to a tenth of the peak (with
    ``optim.grad_clip`` 1.0). A constant 3e-3 with no warmup made the loss rise over the first steps.
    """

    kind: Literal["constant", "linear", "cosine"] = "cosine"
    warmup: Optional[int] = Field(
        None,
        ge=0,
        le=MAX_STEPS,
        description=f"linear warmup steps from 0 (null: {AUTO_WARMUP:.0%} of the stage's steps)",
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="decay ends at lr * min_lr_ratio")

    def warmup_steps(self, total: int) -> int:
        """The warmup of a stage of ``total`` steps: the given one, else ``AUTO_WARMUP`` of the steps (rounded)."""
        return self.warmup if self.warmup is not None else int(round(AUTO_WARMUP * total))


class EvalSpec(_Strict):
    """Periodic evaluation on a few held-out batches (a curve to watch, rank 0), and the final score: the whole
    held-out split item by item (:mod:`audiomoe.train.heldout`), what the run's summary, report and studies rank by."""

    every: int = Field(50, ge=1, le=MAX_STEPS)
    batches: int = Field(4, ge=0, le=1000)
    final: bool = Field(True, description="score the whole held-out split item by item at the end (heldout.json)")
    max_per_task: int = Field(200, ge=1, le=1_000_000, description="held-out items per task of the final score")
    max_generated_per_task: int = Field(16, ge=1, le=1_000_000, description="... for heads that generate (text, codes)")


class HealthSpec(_Strict):
    """Routing health warnings (logged and printed once per layer and kind)."""

    unused_steps: int = Field(100, ge=1, description="warn when an expert got no token for this many steps")
    max_load_share: float = Field(
        0.75, gt=0.0, le=1.0, description="warn when one expert takes more than this share of the load"
    )
    uniform_tolerance: float = Field(
        0.02, ge=0.0, le=1.0, description="router 'stuck at uniform': mean top probability within this of 1/E"
    )
    uniform_checks: int = Field(3, ge=1, description="... for this many routing reports in a row")


class LogSpec(_Strict):
    """Logs in the run directory: ``log.jsonl`` (one JSON object per logged step) and TensorBoard ``tb/``."""

    every: int = Field(1, ge=1, le=MAX_STEPS, description="log a step every N steps")
    jsonl: bool = True
    tensorboard: bool = True
    routing_every: int = Field(
        25, ge=0, le=MAX_STEPS, description="routing statistics per layer every N steps (0: off)"
    )
    health: HealthSpec = Field(default_factory=HealthSpec)


class CheckpointSpec(_Strict):
    """When checkpoints are written (besides at every evaluation and at the end of each stage)."""

    every: int = Field(0, ge=0, le=MAX_STEPS, description="also every N steps (0: only at evaluations and stage ends)")
    keep: int = Field(2, ge=0, le=1000, description="checkpoints kept, newest by step (0: all)")


class DistributedSpec(_Strict):
    """The process layout (:mod:`audiomoe.train.layout`): world = data_parallel x expert_parallel ranks."""

    data_parallel: Optional[int] = Field(
        None, ge=1, le=65536, description="replicas of each EP group (None: world / expert_parallel)"
    )
    expert_parallel: Optional[int] = Field(
        None, ge=1, le=4096, description="ranks sharing the routed experts (None: the spec's, 1)"
    )
    fsdp: bool = Field(
        False,
        description="FSDP2: shard the blocks, the encoder and the rest over every rank; with expert_parallel and "
        "data_parallel > 1 each expert block is also FSDP-sharded over its data_parallel replicas (2-D mesh)",
    )
    param_dtype: Optional[Literal["bf16", "fp32"]] = Field(
        None, description="FSDP compute dtype (None: the parameters')"
    )
    reduce_dtype: Optional[Literal["bf16", "fp32"]] = Field(
        None, description="FSDP gradient-reduce dtype (None: param_dtype)"
    )
    reshard_after_forward: bool = Field(
        True, description="FSDP: free the gathered parameters after each unit's forward"
    )
    meta_init: bool = Field(
        True,
        description="EP / FSDP: build on the meta device, shard, then materialise only this rank's shards "
        "(the seeded init or the resumed checkpoint's rows); false: build the full model on every rank first",
    )


class AuxWeightSpec(_Strict):
    """The UniMoE aux-loss weight of every router that has one, scheduled over the stage."""

    start: float = Field(ge=0.0, le=100.0)
    end: Optional[float] = Field(None, ge=0.0, le=100.0, description="None: constant start")
    steps: Optional[int] = Field(
        None, ge=1, le=MAX_STEPS, description="steps from start to end (None: the stage's steps)"
    )
    kind: Literal["linear", "cosine"] = "linear"
