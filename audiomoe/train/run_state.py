"""The typed state of one training run: what its stages share (:class:`RunState`), what each stage is given
(:class:`RunContext`), and how the saved part of the state is validated when a checkpoint is read (:class:`TrainerExtra`).

A value that must survive a resume is a field of :class:`RunState` (with its bound in :class:`TrainerExtra`),
written into each checkpoint's ``extra`` and read back by :class:`audiomoe.train.checkpointer.Checkpointer`:
those two files are all a new checkpoint field touches. Everything else here lives as long as the process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from audiomoe.core.limits import MAX_STEPS

if TYPE_CHECKING:  # annotations only: this module is imported by the trainer-state schema, which must stay light
    import torch

    from audiomoe.train.checkpointer import Checkpointer
    from audiomoe.train.distributed import Dist
    from audiomoe.train.layout import Layout
    from audiomoe.train.progress import Progress
    from audiomoe.train.recipe import Recipe
    from audiomoe.train.runlog import RunLog
    from audiomoe.train.trainer import RunOptions


@dataclass
class RunState:
    """What the stages of one run share while it trains; the run summary is made from it.

    ``skipped`` and ``fed`` are saved in every checkpoint (``extra.skipped_steps``, ``extra.tasks_seen``)
    and restored on resume; the other fields belong to this process.
    """

    start: int = 0  # the step this process started from (0, or the resumed checkpoint's)
    step: int = 0  # the step in progress (the last one begun)
    loss: float = math.nan  # the last step's training loss, averaged over the ranks
    checkpoint: Optional[Path] = None  # the last good checkpoint: written by this run, or resumed from
    skipped: int = 0  # optimizer steps skipped for a NaN / inf gradient norm (optim.on_nonfinite: skip)
    fed: set[str] = field(default_factory=set)  # the tasks the training batches held items of
    history: list[dict[str, Any]] = field(default_factory=list)  # the mid-run evaluations, in order
    before: Optional[dict[str, float]] = None  # the evaluation before this process's first step
    log: Optional[RunLog] = None  # log.jsonl / TensorBoard, opened by the first stage that trains
    data_summary: Optional[dict[str, Any]] = None  # what the last stage's data reader reports
    warnings: list[dict[str, Any]] = field(default_factory=list)  # {"step", "warning"}: the summary's list


@dataclass
class RunContext:
    """What every main-model stage of a run is given (:class:`audiomoe.train.steploop.StageRun`)."""

    recipe: Recipe  # with the model spec trained (what a resume builds)
    model: torch.nn.Module
    dist: Dist
    layout: Layout  # EP / FSDP / DDP over the ranks
    root: Optional[Path]  # the run directory on every rank; None: nothing is written
    opts: RunOptions
    bar: Progress
    built: set[str]  # tensors trainable as built (frozen weak specialists are taken out of it)
    checkpointer: Checkpointer
    state: RunState
    start_run: Callable[[], None]  # records the run (run.json) once it really starts


class TrainerExtra(BaseModel):
    """The decoded ``extra`` fields resuming reads (stage position, world size, counters); others pass through."""

    model_config = ConfigDict(extra="allow", strict=True)

    stage: Optional[StrictInt] = Field(None, ge=0)
    stage_name: Optional[StrictStr] = None
    stage_step: Optional[StrictInt] = Field(None, ge=0, le=MAX_STEPS)
    world: Optional[StrictInt] = Field(None, ge=1, le=1 << 20)
    tasks_seen: Optional[list[StrictStr]] = None
    skipped_steps: Optional[StrictInt] = Field(None, ge=0, le=MAX_STEPS)
