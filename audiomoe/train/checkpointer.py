"""One owner for a run's checkpoints: which one it resumes, what each holds, when one is written, how many are kept.

The files and their atomic write protocol are :mod:`.checkpoint`; this is what a run does with them.
:meth:`Checkpointer.choose` picks the checkpoint a resumed run continues from; the constructor reads its
trainer state and restores the run state (:class:`~audiomoe.train.run_state.RunState`) from it; a stage
that resumes mid-way takes its optimizer, RNG and data position back (:meth:`~Checkpointer.load_optimizer`,
:meth:`~Checkpointer.restore_rng`, :meth:`~Checkpointer.restore_data`). Each step ends in
:meth:`~Checkpointer.maybe_save`: at every evaluation, every ``checkpoint.every`` steps and at each stage's
end, every rank contributes its RNG state and data position, a sharded layout gathers its one-process
tensors (:mod:`.fullstate`, collective) and rank 0 writes, keeping ``checkpoint.keep`` checkpoints.

A checkpoint's ``extra`` holds the stage position (``stage``, ``stage_name``, ``stage_step``), ``world``,
this rank's and every rank's data position (``data``, ``data_ranks``), every rank's RNG (``rng_ranks``,
``cuda_rng_ranks``) and the saved run state (``tasks_seen``, ``skipped_steps``): :meth:`Checkpointer._extra`
writes it and :meth:`Checkpointer._restore_state` reads the run state back.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.train.checkpoint import CheckpointError, load_trainer_state, read_latest, save_checkpoint
from audiomoe.train.distributed import Dist
from audiomoe.train.layout import Layout
from audiomoe.train.recipe import CheckpointSpec
from audiomoe.train.run_state import RunState
from audiomoe.train.rundir import RunDir, resume_point


class _Stage(NamedTuple):
    """The stage now training, as its checkpoints record it."""

    idx: int
    name: str
    optimizer: torch.optim.Optimizer
    data: Any  # the batch iterator (its state_dict() is the data position, when it has one)


class Checkpointer:
    """A run's checkpoints (module doc). ``resume_from``: the checkpoint the run continues from, or None."""

    def __init__(
        self,
        dist: Dist,
        run: Optional[RunDir],
        root: Optional[Path],
        resume_from: Optional[Path],
        model: torch.nn.Module,
        layout: Layout,
        spec: CheckpointSpec,
    ) -> None:
        self.dist, self.run, self.root, self.model, self.layout, self.spec = dist, run, root, model, layout, spec
        # the optimizer's tensors stay in the file until a stage loads them (a sharded rank: only its rows)
        self.resumed: Optional[dict[str, Any]] = (
            load_trainer_state(resume_from, lazy_optimizer=True) if resume_from is not None else None
        )
        self.start = int(self.resumed["step"]) if self.resumed is not None else 0
        self.saved_extra: dict[str, Any] = (self.resumed or {}).get("extra") or {}
        self.state = self._restore_state(resume_from)
        self._stage: Optional[_Stage] = None

    @staticmethod
    def choose(
        dist: Dist, run: Optional[RunDir], root: Optional[Path], at: Optional[Path], resume: bool
    ) -> Optional[Path]:
        """The checkpoint a run continues from: the one rank 0 picked opening the run directory (``at``, ``latest``,
        or the newest intact one), found the same way by the other ranks; None for a fresh run."""
        chosen = run.resume_from if run is not None else None
        if not dist.main and root is not None and resume:  # rank 0 checked and cleaned the run: the same answer
            chosen = resume_point(root, at)[0]
        return chosen

    def _restore_state(self, resume_from: Optional[Path]) -> RunState:
        """The run state as the resumed checkpoint left it (a fresh one for a new run)."""
        return RunState(
            start=self.start,
            step=self.start,
            checkpoint=resume_from,
            fed=set(self.saved_extra.get("tasks_seen") or []),
            skipped=self.saved_extra.get("skipped_steps") or 0,
        )

    # -- resuming ----------------------------------------------------------------------------------

    def resumes_within(self, first: int) -> bool:
        """Whether the run resumes inside the stage whose steps follow global step ``first``."""
        return self.resumed is not None and self.start > first

    def trained_past(self, idx: int) -> bool:
        """Whether the resumed main model has begun training, or reached a stage after ``idx`` (side runs then are done)."""
        return int(self.saved_extra.get("stage", -1)) > idx or self.start > 0

    def restore_rng(self, seed: int) -> None:
        """This rank's RNG state from the checkpoint (when the world size matches; else reseeded, with a warning).

        Called once when a run resumes, whatever the stage: a resume at a stage boundary needs the RNG
        where the previous stage left it, as an unbroken run has it.
        """
        if self.resumed is None:
            return
        extra, dist = self.saved_extra, self.dist
        if int(extra.get("world", 1)) == dist.world and "rng_ranks" in extra:
            torch.set_rng_state(extra["rng_ranks"][dist.rank].clone())
            if "cuda_rng_ranks" in extra and dist.device.type == "cuda":
                torch.cuda.set_rng_state(extra["cuda_rng_ranks"][dist.rank].clone(), dist.device)
        elif "rng_ranks" in extra:
            warnings.warn(
                f"resuming a {int(extra['world'])}-process run with {dist.world} processes: the data order and random "
                "draws differ from an unbroken run (weights, optimizer and step are restored)",
                RuntimeWarning,
                stacklevel=2,
            )
            torch.manual_seed(seed + dist.rank + self.start)
        else:  # a checkpoint of an older version: one process's RNG
            torch.set_rng_state(self.resumed["rng"]["torch"])

    def load_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The resumed stage's optimizer state: as saved, or sliced for this rank's experts / FSDP shards."""
        assert self.resumed is not None
        path = self.resumed["path"]
        if not self.layout.sharded:
            load_trainer_state(path, optimizer)
            return
        from audiomoe.train.fullstate import load_full_optimizer_state_dict

        state = self.resumed["optimizer"]  # the one-process state, its tensors still in the file (StoredTensor)
        if state is None:
            raise CheckpointError("the checkpoint holds no optimizer state; it cannot continue a stage")
        try:
            load_full_optimizer_state_dict(self.model, optimizer, state)
        except (ValueError, KeyError, RuntimeError, IndexError) as exc:
            raise CheckpointError(
                f"the checkpoint's optimizer state does not fit this model at this layout: {exc}"
            ) from None

    def restore_data(self, data: Any) -> None:
        """This rank's data position from the checkpoint (its own when the world size matches)."""
        extra, dist = self.saved_extra, self.dist
        loader_state = None
        if int(extra.get("world", 1)) == dist.world and "data_ranks" in extra and extra.get("data") is not None:
            e, b, s = (int(x) for x in extra["data_ranks"][dist.rank].tolist())
            loader_state = {"epoch": e, "batch": b, "seed": s}
        elif extra.get("data") is not None:
            loader_state = extra["data"]
        if loader_state is not None and callable(getattr(data, "load_state_dict", None)):
            data.load_state_dict(loader_state)

    # -- saving ------------------------------------------------------------------------------------

    def attach(self, idx: int, name: str, optimizer: torch.optim.Optimizer, data: Any) -> None:
        """The stage now training: its index and name, its optimizer and its data (their states are saved)."""
        self._stage = _Stage(idx, name, optimizer, data)

    def maybe_save(self, step: int, local: int, *, final: bool, evaluated: bool) -> None:
        """Write step ``step`` (``local`` within its stage) when it is due: after an evaluation, every
        ``checkpoint.every`` steps, and at the stage's ``final`` step. Collective when due (every rank calls it)."""
        every = self.spec.every
        if self.root is not None and (evaluated or (every and step % every == 0) or final):
            self.save(step, local)

    def save(self, step: int, local: int) -> None:
        """Write a checkpoint of ``step`` (collective: every rank contributes; rank 0 writes and prunes)."""
        assert self._stage is not None, "attach() a stage before saving"
        optimizer, dist = self._stage.optimizer, self.dist
        extra = self._extra(local)
        model_state, opt_state = self._full_states(optimizer)
        error = None
        if dist.main and self.run is not None:
            try:
                self.state.checkpoint = save_checkpoint(
                    self.model,
                    self.run.path,
                    step,
                    optimizer,
                    self.spec.keep,
                    extra=extra,
                    model_state=model_state,
                    optimizer_state=opt_state,
                )
            except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know (else they wait in the next collective)
                error = exc
        if not dist.all_ok(error is None):
            if error is not None:
                raise error
            raise AudioMoEError(f"rank 0 could not write the checkpoint of step {step}; its message says why")

    def _extra(self, local: int) -> dict[str, Any]:
        """A checkpoint's ``extra`` (module doc); gathers every rank's RNG and data position (collective)."""
        assert self._stage is not None
        stage, dist = self._stage, self.dist
        data = stage.data
        state = data.state_dict() if callable(getattr(data, "state_dict", None)) else None
        pos = torch.tensor(
            [int(state["epoch"]), int(state["batch"]), int(state.get("seed", 0))] if state else [0, 0, 0],
            dtype=torch.long,
        )
        extra: dict[str, Any] = {
            "stage": stage.idx,
            "stage_name": stage.name,
            "stage_step": local,
            "world": dist.world,
            "data": state,
            "data_ranks": dist.gather(pos),
            "rng_ranks": dist.gather(torch.get_rng_state()),
            "tasks_seen": sorted(self.state.fed),
            "skipped_steps": self.state.skipped,
        }
        if dist.device.type == "cuda":
            extra["cuda_rng_ranks"] = dist.gather(torch.cuda.get_rng_state(dist.device))
        return extra

    def _full_states(self, optimizer: torch.optim.Optimizer) -> tuple[Optional[dict], Optional[dict]]:
        """``(model, optimizer)`` one-process state dicts of a sharded layout, gathered by every rank for rank 0
        (None, None unsharded: the checkpoint takes the live ones)."""
        if not self.layout.sharded:
            return None, None
        from audiomoe.train.fullstate import full_optimizer_state_dict, full_state_dict

        return full_state_dict(self.model, rank0_only=True), full_optimizer_state_dict(
            self.model, optimizer, rank0_only=True
        )

    def last_good(self) -> Optional[Path]:
        """The last good checkpoint: what ``latest`` names (an interrupt may land inside a save, after ``latest``
        moved on), else the last one written or resumed."""
        ckpt = self.state.checkpoint
        if self.run is not None:
            try:
                ckpt = read_latest(self.run.path) or ckpt
            except AudioMoEError:
                pass
        return ckpt
