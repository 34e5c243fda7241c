"""One stage of a run, step by step: init, freezing, optimizer, data, and the optimizer-step loop.

A step (:meth:`StageRun._step`) reads like torchtitan's: the data (``accumulation`` micro-batches), forward
and backward (under the precision's autocast, backward of ``loss / accumulation``; under DDP only the last
one all-reduces), the global gradient norm (clipped when ``grad_clip``; NaN / inf stops the run naming the
first bad parameter, or with ``optim.on_nonfinite: skip`` skips this step's update, counted), the lr of the
stage's schedule at this step, ``optimizer.step()``, ``model.advance_schedules()`` (aux weights and noise
move once per optimizer step), the log, then ``evaluator.maybe_run`` (:class:`~audiomoe.train.evaluate.Evaluator`)
and ``checkpointer.maybe_save`` (:class:`~audiomoe.train.checkpointer.Checkpointer`). Times are split into
data / forward / backward / optimizer. Rank 0 logs, evaluates and writes checkpoints. Under expert
parallelism or FSDP (:mod:`.layout`) every rank evaluates, and the norm is taken over the shards after the
expert gradients are reduced. A trainable tensor whose gradient stays zero over a stage's first steps is
warned about (:mod:`.gradcheck`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.train.data import build_data
from audiomoe.train.evaluate import Evaluator
from audiomoe.train.gradcheck import ZeroGradWatch, first_nonfinite_grad
from audiomoe.train.groups import apply_trainable, lr_multipliers, trainable_names
from audiomoe.train.optim import autocast, build_optimizer, lr_factor, set_lr
from audiomoe.train.run_state import RunContext
from audiomoe.train.runlog import RoutingMonitor, RunLog
from audiomoe.train.stages import apply_aux_weight, apply_init
from audiomoe.train.weak_pretrain import weak_stage


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``checkpoint`` is the last good checkpoint (``None`` if none was written)."""

    def __init__(self, step: int, checkpoint: Optional[Path]) -> None:
        self.step, self.checkpoint = step, checkpoint
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"interrupted at step {step}; {where}")


_NOTED_SKIPS = 3  # skipped steps noted on the progress output and in the summary's warnings


@dataclass
class _Step:
    """What one optimizer step measured: its passes over the micro-batches, then its loss, norm and lr."""

    loss_sum: torch.Tensor  # the micro-batches' losses, summed (this rank)
    terms: dict[str, float] = field(default_factory=dict)  # each loss term, averaged over the micro-batches
    out: Any = None  # the last micro-batch's ModelOutput (its routing statistics)
    forward: float = 0.0  # seconds
    backward: float = 0.0
    loss: float = math.nan  # averaged over micro-batches and ranks
    grad_norm: Optional[float] = None  # None when the step was skipped
    lr: float = 0.0
    skipped: bool = False  # a NaN / inf norm under optim.on_nonfinite: skip


class StageRun:
    """Runs stage ``idx`` of the run whose global steps start after ``first``, from its start or the resumed checkpoint."""

    def __init__(self, ctx: RunContext, idx: int, first: int) -> None:
        self.ctx, self.idx, self.first = ctx, idx, first
        self.recipe, self.model, self.dist, self.state = ctx.recipe, ctx.model, ctx.dist, ctx.state
        self.st = ctx.recipe.stages[idx]
        self.where = f"stages.{idx}"
        self.fresh = not ctx.checkpointer.resumes_within(first)

    # -- setup -------------------------------------------------------------------------------------

    def _setup(self) -> None:
        self.report: dict[str, Any] = {
            "name": self.st.name,
            "first_step": self.first + 1,
            "last_step": self.first + self.st.steps,
        }
        names = self._prepare_model()
        self._build_optimizer(names)
        eval_data = self._build_data()
        self.ctx.checkpointer.attach(self.idx, self.st.name, self.opt, self.data)
        self.evaluator = Evaluator(self.model, self.dist, eval_data, self.recipe.eval.every, self.state)  # collective
        self.ctx.start_run()
        r, dist, state = self.recipe, self.dist, self.state
        if state.log is None:  # one log per process; records after the step this process started from are dropped
            active = dist.main and self.ctx.root is not None and (r.log.jsonl or r.log.tensorboard)
            state.log = RunLog(self.ctx.root, r.log, state.start, active=active)
        self.log: RunLog = state.log
        self.monitor = RoutingMonitor(r.log.health)
        if not self.fresh:
            self.ctx.checkpointer.restore_data(self.data)
        self.evaluator.before()
        # DDP per stage (its trainable set); FSDP: the model itself
        self.ddp = self.ctx.layout.wrap(self.model, dist.device)

    def _prepare_model(self) -> set[str]:
        """The stage's init, its trainable tensors and aux-weight schedule, then the layout's shards; the trainable names."""
        r, st, model, ctx = self.recipe, self.st, self.model, self.ctx
        if self.fresh and st.init is not None:  # a later stage of a sharded run inits a gathered full copy (layout.py)
            init = ctx.layout.on_full_model(model, lambda m: apply_init(m, st.init, r, ctx.root, self.where))
            self.report["init"] = init
        # MoWE weak specialists: pretrained (fresh stage), then kept frozen
        self.report.update(weak_stage(ctx, self.idx, self.fresh))
        names = trainable_names(model, st.train, st.freeze, ctx.built, self.where)
        apply_trainable(model, names)
        self.report["trainable_tensors"] = len(names)
        # one-process counts
        self.report["trainable_parameters"] = sum(p.numel() for n, p in model.named_parameters() if n in names)
        apply_aux_weight(model, st.aux_weight, st.steps, self.fresh, self.where)
        ctx.layout.prepare(model)  # EP shards / FSDP2 (once per run): the optimizer must see the sharded tensors
        # a tensor frozen now keeps no gradient of the last stage (a sharded norm counts every one)
        model.zero_grad(set_to_none=True)
        return names

    def _build_optimizer(self, names: set[str]) -> None:
        """The stage's AdamW over ``names`` (its state from the checkpoint when the stage resumes)."""
        st = self.st
        self.ospec, self.sched = self.recipe.stage_optim(st), st.schedule or self.recipe.schedule
        mults = lr_multipliers(self.model, self.ospec.lr_mult, f"{self.where}.optim" if st.optim else "optim")
        self.named = [(n, p) for n, p in self.model.named_parameters() if n in names]
        self.params = [p for _, p in self.named]
        self.opt = build_optimizer(self.named, self.ospec, mults)
        if not self.fresh:
            self.ctx.checkpointer.load_optimizer(self.opt)
            for g in self.opt.param_groups:  # the options given now win over those the state was saved with
                g.update(weight_decay=self.ospec.weight_decay, betas=tuple(self.ospec.betas), eps=self.ospec.eps)

    def _build_data(self) -> list[Any]:
        """The stage's training batches (``self.data``); returns its held-out batches (this rank's share to evaluate)."""
        r, dist, opts, sharded = self.recipe, self.dist, self.ctx.opts, self.ctx.layout.sharded
        if opts.data is not None:
            given = opts.data  # a list of batches works as well as an iterator
            self.data, eval_data = (given if hasattr(given, "__next__") else iter(given)), list(opts.eval_data or [])
        else:
            self.data, eval_data = build_data(
                self.model,
                r.data,
                self.st.data,
                batch_size=r.batch_size,
                seed=r.seed,
                eval_batches=r.eval.batches if dist.main or sharded else 0,
                rank=dist.rank,
                world=dist.world,
                progress=opts.progress and dist.main,
                workers=opts.workers,
            )
        # a sharded forward is collective: every rank evaluates the same batches (rank 0 records them)
        return eval_data if dist.main or sharded else []

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the stage to its last step; return its summary."""
        self._setup()
        t_stage = time.perf_counter()
        self._announce()
        # per-rank gradients of a sharded layout differ: the watch runs where every rank holds whole gradients
        watch = None if self.ctx.layout.sharded else ZeroGradWatch(self.model, self.named, self.st.name)
        local0 = self.ctx.checkpointer.start - self.first if not self.fresh else 0
        for local in range(local0 + 1, self.st.steps + 1):
            self._step(local, watch)
        if callable(getattr(self.data, "summary", None)):
            self.state.data_summary = self.data.summary()
        if self.evaluator.latest is not None:
            self.report["eval"] = self.evaluator.latest
        self.report.update(final_loss=self.state.loss, seconds=round(time.perf_counter() - t_stage, 2))
        return self.report

    def _announce(self) -> None:
        """The stage's first line, and a warning when its lr never gets past the warmup."""
        st, first = self.st, self.first
        if len(self.recipe.stages) > 1:
            self.ctx.bar.note(
                f"stage {self.idx} '{st.name}': steps {first + 1}..{first + st.steps}, "
                f"{self.report['trainable_parameters']:,} trainable parameters"
            )
        warmup = self.sched.warmup_steps(st.steps)
        if warmup >= st.steps > 0:
            self._warn(
                first,
                f"stage '{st.name}' warms the lr up over {warmup} steps but has {st.steps}: "
                "the lr reaches its peak only at the end, if at all, and never decays (lower schedule.warmup)",
            )

    def _step(self, local: int, watch: Optional[ZeroGradWatch]) -> None:
        """One optimizer step: data, forward and backward, clip and step, log, evaluation, checkpoint."""
        step = self.first + local
        self.state.step = step
        t0 = time.perf_counter()
        batches = self._next_batches(step)
        t_data = time.perf_counter() - t0
        done = self._forward_backward(batches)
        if watch is not None:
            self._warn(step, watch.update({t for b in batches for t in b.task_list()}))
        self._loss(step, done)
        t3 = time.perf_counter()
        self._optimizer_step(step, local, done)
        times = {
            "data": t_data,
            "forward": done.forward,
            "backward": done.backward,
            "optimizer": time.perf_counter() - t3,
        }
        self.ctx.bar.step(step, done.loss, {k[5:]: v for k, v in done.terms.items() if k.startswith("task/")})
        final = local == self.st.steps
        if step % self.recipe.log.every == 0 or final or done.skipped:
            times["step"] = time.perf_counter() - t0
            self._log_step(step, local, done, batches, times)
        self._log_routing(step, done.out, batches)
        evaluated = self.evaluator.maybe_run(step, final, done.loss)
        self.ctx.checkpointer.maybe_save(step, local, final=final, evaluated=evaluated)

    def _next_batches(self, step: int) -> list[Any]:
        try:
            return [next(self.data) for _ in range(self.ospec.accumulation)]
        except StopIteration:
            raise AudioMoEError(
                f"the data ran out at step {step} of {self.first + self.st.steps}: give at least that many batches "
                "(x accumulation), or an endless iterator (itertools.cycle)"
            ) from None

    def _sync(self) -> None:
        """Wait for the device (so the split times are the device's, not the launch queue's)."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)

    def _forward_backward(self, batches: list[Any]) -> _Step:
        """Forward and backward of every micro-batch (gradients accumulate; DDP reduces after the last one)."""
        acc, model, dist = len(batches), self.model, self.dist
        self.opt.zero_grad(set_to_none=True)
        done = _Step(loss_sum=torch.zeros((), device=dist.device))
        for j, batch in enumerate(batches):
            quiet = self.ddp.no_sync() if self.ddp is not model and j < acc - 1 else contextlib.nullcontext()
            with quiet:
                t1 = time.perf_counter()
                with autocast(self.recipe.precision, dist.device):
                    out = self.ddp(batch, predict=False)  # training never generates
                if out.loss is None:
                    raise AudioMoEError("training batches must carry targets")
                self._sync()
                t2 = time.perf_counter()
                (out.loss.float() / acc).backward()
                self._sync()
                done.forward, done.backward = done.forward + t2 - t1, done.backward + time.perf_counter() - t2
            self.state.fed.update(out.indices)
            done.loss_sum += out.loss.detach().float()
            for k, v in out.losses.items():
                done.terms[k] = done.terms.get(k, 0.0) + float(v.detach()) / acc
            if self.recipe.log.routing_every and dist.main:
                self.monitor.update(out.routing)
            done.out = out
        return done

    def _loss(self, step: int, done: _Step) -> None:
        """The step's loss averaged over micro-batches and ranks; a NaN / inf stops the run before the update."""
        loss = done.loss = self.state.loss = float(self.dist.mean(done.loss_sum / self.ospec.accumulation))
        if not math.isfinite(loss):  # checked before the optimizer step: the weights stay the last good step's
            last = f"; the last good checkpoint is {self.state.checkpoint}" if self.state.checkpoint else ""
            raise AudioMoEError(
                f"loss became {loss} at step {step}; lower the learning rate (lr={self.ospec.lr}){last}"
            )

    def _optimizer_step(self, step: int, local: int, done: _Step) -> None:
        """Clip, set the lr, step (unless the norm is NaN / inf and such steps are skipped)."""
        gnorm = self.ctx.layout.clip(self.model, self.params, self.ospec.grad_clip)  # EP: expert grads reduced first
        # the norm is global (DDP-averaged, or reduced over the shards): every rank takes the same branch
        done.skipped = not math.isfinite(gnorm) and self._nonfinite(step, gnorm)
        done.grad_norm = None if done.skipped else gnorm
        done.lr = set_lr(self.opt, self.ospec.lr, lr_factor(local, self.st.steps, self.sched))
        if not done.skipped:
            self.opt.step()
        self.model.advance_schedules()  # aux-weight / noise schedules: once per optimizer step, never per forward
        self._sync()

    def _log_step(self, step: int, local: int, done: _Step, batches: list[Any], times: dict[str, float]) -> None:
        """The step's record in log.jsonl / TensorBoard."""
        record = {
            "step": step,
            "stage": self.st.name,
            "stage_step": local,
            "loss": done.loss,
            "losses": done.terms,
            "lr": done.lr,
            "grad_norm": done.grad_norm,
            "skipped": done.skipped,
            "skipped_steps": self.state.skipped,
            "items": sum(len(b.task_list()) for b in batches) * self.dist.world,
            "time": {k: round(v, 6) for k, v in times.items()},
        }
        self.log.step(record)

    def _log_routing(self, step: int, out: Any, batches: list[Any]) -> None:
        """Every ``log.routing_every`` steps (rank 0): routing statistics and health warnings."""
        every = self.recipe.log.routing_every
        if not (every and self.dist.main and step % every == 0 and out.routing):
            return
        stats, warns = self.monitor.report(
            out.routing, out.routing_tasks(batches[-1].task_list()), self.model.task_names
        )
        self.log.routing(step, stats, warns)
        for w in warns:
            self.ctx.bar.note(f"warning: {w}")
        self.state.warnings.extend({"step": step, "warning": w} for w in warns)

    # -- warnings and non-finite gradients ---------------------------------------------------------

    def _warn(self, step: int, text: Optional[str]) -> None:
        """A warning (if any) on the progress output, in the log and in the run summary."""
        if text:
            self.ctx.bar.note(f"warning: {text}")
            self.log.warning(step, text)
            self.state.warnings.append({"step": step, "warning": text})

    def _nonfinite(self, step: int, gnorm: float) -> bool:
        """A NaN/inf gradient norm before the optimizer step: skip it (True) or stop, per ``optim.on_nonfinite``."""
        if self.ospec.on_nonfinite == "skip":
            self.state.skipped += 1
            n = self.state.skipped
            if n <= _NOTED_SKIPS:  # a run that keeps overflowing must not flood the output: the log counts every one
                more = "; further skipped steps are only counted (log.jsonl, summary.json)" if n == _NOTED_SKIPS else ""
                self._warn(
                    step,
                    f"step {step}: gradient norm is {gnorm}; the optimizer step was skipped "
                    f"(optim.on_nonfinite=skip){more}",
                )
            return True
        bad = first_nonfinite_grad(self.named)
        where = (
            f"the first parameter with a non-finite gradient is '{bad}'"
            if bad
            else "the non-finite gradient is in another rank's shard"
        )
        ckpt = self.state.checkpoint
        last = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
        raise AudioMoEError(
            f"gradient norm became {gnorm} at step {step} (its optimizer step was not taken): {where}; {last}. "
            f"Fix what computes that gradient, lower the learning rate (lr={self.ospec.lr}), "
            "or skip such steps: --set optim.on_nonfinite=skip"
        )
