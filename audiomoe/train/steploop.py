"""One stage of a run, step by step: init, freezing, optimizer, data, and the optimizer-step loop.

A step: ``accumulation`` micro-batches (forward under the precision's autocast, backward of
``loss / accumulation``; under DDP only the last one all-reduces), the global gradient norm
(clipped when ``grad_clip``; NaN / inf stops the run naming the first bad parameter, or with
``optim.on_nonfinite: skip`` skips this step's update, counted), the lr of the stage's schedule at
this step, ``optimizer.step()``, then ``model.advance_schedules()`` (aux weights and noise move
once per optimizer step). Times are split into data / forward / backward / optimizer. Rank 0
logs, evaluates and writes checkpoints; every rank contributes its RNG state and sampler position
to each checkpoint. Under expert parallelism or FSDP (:mod:`.layout`) every rank evaluates and
gathers each checkpoint's one-process tensors with rank 0, and the norm is taken over the shards
after the expert gradients are reduced.
A trainable tensor whose gradient stays zero over a stage's first steps is warned about (:mod:`.gradcheck`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.train.checkpoint import load_trainer_state, save_checkpoint
from audiomoe.train.data import build_data
from audiomoe.train.evaluate import evaluate
from audiomoe.train.gradcheck import ZeroGradWatch, first_nonfinite_grad
from audiomoe.train.groups import apply_trainable, lr_multipliers, trainable_names
from audiomoe.train.optim import autocast, build_optimizer, lr_factor, set_lr
from audiomoe.train.runlog import RoutingMonitor, RunLog
from audiomoe.train.stages import apply_aux_weight, apply_init
from audiomoe.train.weak_pretrain import weak_stage


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; ``checkpoint`` is the last good checkpoint (``None`` if none was written)."""

    def __init__(self, step: int, checkpoint: Optional[Path]) -> None:
        self.step, self.checkpoint = step, checkpoint
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"interrupted at step {step}; {where}")


def restore_rng(state: dict[str, Any], dist: Any, seed: int) -> None:
    """Every rank's RNG state from the checkpoint (this rank's own when the world size matches).

    Called once when a run resumes, whatever the stage: a resume at a stage boundary needs the RNG
    where the previous stage left it, as an unbroken run has it.
    """
    extra = state.get("extra") or {}
    if int(extra.get("world", 1)) == dist.world and "rng_ranks" in extra:
        torch.set_rng_state(extra["rng_ranks"][dist.rank].clone())
        if "cuda_rng_ranks" in extra and dist.device.type == "cuda":
            torch.cuda.set_rng_state(extra["cuda_rng_ranks"][dist.rank].clone(), dist.device)
    elif "rng_ranks" in extra:
        warnings.warn(f"resuming a {int(extra['world'])}-process run with {dist.world} processes: the data order and random "
                      "draws differ from an unbroken run (weights, optimizer and step are restored)", RuntimeWarning, stacklevel=2)
        torch.manual_seed(seed + dist.rank + int(state["step"]))
    else:  # a checkpoint of an older version: one process's RNG
        torch.set_rng_state(state["rng"]["torch"])


_NOTED_SKIPS = 3  # skipped steps noted on the progress output and in the summary's warnings


def _rng_devices(dist: Any) -> list[Any]:
    return [dist.device] if dist.device.type == "cuda" else []


class StageRun:
    """Runs stage ``idx`` of ``recipe`` on ``model`` (``state``: the checkpoint to continue it from, or None)."""

    def __init__(self, recipe: Any, idx: int, first: int, model: Any, built: set[str], dist: Any, run: Any, root: Optional[Path],
                 opts: Any, bar: Any, shared: dict[str, Any], state: Optional[dict[str, Any]], start_run: Callable[[], None]) -> None:
        self.recipe, self.idx, self.first, self.model, self.built, self.dist = recipe, idx, first, model, built, dist
        self.run_dir, self.root, self.opts, self.bar, self.shared, self.state, self.start_run = run, root, opts, bar, shared, state, start_run
        self.st = recipe.stages[idx]
        self.where = f"stages.{idx}"

    def _setup(self) -> None:
        r, st, model, dist = self.recipe, self.st, self.model, self.dist
        fresh = self.state is None
        self.report: dict[str, Any] = {"name": st.name, "first_step": self.first + 1, "last_step": self.first + st.steps}
        layout = self.layout = self.shared["layout"]
        if fresh and st.init is not None:  # a later stage of a sharded run inits a gathered full copy (layout.py)
            self.report["init"] = layout.on_full_model(model, lambda m: apply_init(m, st.init, r, self.root, self.where))
        self.report.update(weak_stage(self, fresh))  # MoWE weak specialists: pretrained (fresh stage), then kept frozen
        names = trainable_names(model, st.train, st.freeze, self.built, self.where)
        apply_trainable(model, names)
        self.report["trainable_tensors"] = len(names)
        self.report["trainable_parameters"] = sum(p.numel() for n, p in model.named_parameters() if n in names)  # one-process counts
        apply_aux_weight(model, st.aux_weight, st.steps, fresh, self.where)
        layout.prepare(model)  # EP shards / FSDP2 (once per run): the optimizer must see the sharded tensors
        model.zero_grad(set_to_none=True)  # a tensor frozen now keeps no gradient of the last stage (a sharded norm counts every one)
        self.ospec, self.sched = r.stage_optim(st), st.schedule or r.schedule
        mults = lr_multipliers(model, self.ospec.lr_mult, f"{self.where}.optim" if st.optim else "optim")
        self.named = [(n, p) for n, p in model.named_parameters() if n in names]
        self.params = [p for _, p in self.named]
        self.opt = build_optimizer(self.named, self.ospec, mults)
        if not fresh:
            if layout.sharded:  # the checkpoint holds the one-process state: slice it for this rank
                layout.load_optimizer(model, self.opt, load_trainer_state(self.state["path"])["optimizer"])
            else:
                load_trainer_state(self.state["path"], self.opt)
            for g in self.opt.param_groups:  # the options given now win over those the state was saved with
                g.update(weight_decay=self.ospec.weight_decay, betas=tuple(self.ospec.betas), eps=self.ospec.eps)
        if self.opts.data is not None:
            given = self.opts.data  # a list of batches works as well as an iterator
            self.data, eval_data = (given if hasattr(given, "__next__") else iter(given)), list(self.opts.eval_data or [])
        else:
            self.data, eval_data = build_data(
                model, r.data, st.data, batch_size=r.batch_size, seed=r.seed, eval_batches=r.eval.batches if dist.main or layout.sharded else 0,
                rank=dist.rank, world=dist.world, progress=self.opts.progress and dist.main, workers=self.opts.workers)
        # a sharded forward is collective: every rank evaluates the same batches (rank 0 records them)
        self.eval_data = eval_data if dist.main or layout.sharded else []
        self.has_eval = int(dist.gather(torch.tensor([len(self.eval_data)]))[0, 0]) > 0
        self.start_run()
        if "log" not in self.shared:
            # one log per process; records after the step this process started from are dropped
            self.shared["log"] = RunLog(self.root, r.log, self.shared["start"], active=dist.main and self.root is not None and (r.log.jsonl or r.log.tensorboard))
        self.log: RunLog = self.shared["log"]
        self.monitor = RoutingMonitor(r.log.health)
        if not fresh:
            self._restore(self.state)
        if self.shared["before"] is None and self.eval_data:
            self.shared["before"] = self._eval()
        self.ddp = layout.wrap(model, dist.device)  # DDP per stage (its trainable set); FSDP: the model itself

    def _restore(self, state: dict[str, Any]) -> None:
        """This rank's data position from the checkpoint (its own when the world size matches)."""
        extra, dist = state.get("extra") or {}, self.dist
        loader_state = None
        if int(extra.get("world", 1)) == dist.world and "data_ranks" in extra and extra.get("data") is not None:
            e, b, s = (int(x) for x in extra["data_ranks"][dist.rank].tolist())
            loader_state = {"epoch": e, "batch": b, "seed": s}
        elif extra.get("data") is not None:
            loader_state = extra["data"]
        if loader_state is not None and callable(getattr(self.data, "load_state_dict", None)):
            self.data.load_state_dict(loader_state)

    def _eval(self) -> dict[str, float]:
        with torch.random.fork_rng(devices=_rng_devices(self.dist)):  # eval never moves the training RNG
            return evaluate(self.model, self.eval_data)

    def _checkpoint(self, step: int, local: int) -> None:
        dist = self.dist
        state = self.data.state_dict() if callable(getattr(self.data, "state_dict", None)) else None
        pos = torch.tensor([int(state["epoch"]), int(state["batch"]), int(state.get("seed", 0))] if state else [0, 0, 0], dtype=torch.long)
        extra: dict[str, Any] = {
            "stage": self.idx, "stage_name": self.st.name, "stage_step": local, "world": dist.world, "data": state,
            "data_ranks": dist.gather(pos), "rng_ranks": dist.gather(torch.get_rng_state()), "tasks_seen": sorted(self.shared["fed"]),
            "skipped_steps": self.shared["skipped"],
        }
        if dist.device.type == "cuda":
            extra["cuda_rng_ranks"] = dist.gather(torch.cuda.get_rng_state(dist.device))
        model_state, opt_state = self.layout.states(self.model, self.opt)  # sharded: gathered by every rank, for rank 0
        error = None
        if dist.main and self.run_dir is not None:
            try:
                self.shared["ckpt"] = save_checkpoint(self.model, self.run_dir.path, step, self.opt, self.recipe.checkpoint.keep, extra=extra,
                                                      model_state=model_state, optimizer_state=opt_state)
            except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know (else they wait in the next collective)
                error = exc
        if not dist.all_ok(error is None):
            if error is not None:
                raise error
            raise AudioMoEError(f"rank 0 could not write the checkpoint of step {step}; its message says why")

    def _warn(self, step: int, text: Optional[str]) -> None:
        """A warning (if any) on the progress output, in the log and in the run summary."""
        if text:
            self.bar.note(f"warning: {text}")
            self.log.warning(step, text)
            self.shared.setdefault("warnings", []).append({"step": step, "warning": text})

    def _nonfinite(self, step: int, gnorm: float) -> bool:
        """A NaN/inf gradient norm before the optimizer step: skip it (True) or stop, per ``optim.on_nonfinite``."""
        if self.ospec.on_nonfinite == "skip":
            self.shared["skipped"] += 1
            n = self.shared["skipped"]
            if n <= _NOTED_SKIPS:  # a run that keeps overflowing must not flood the output: the log counts every one
                more = "; further skipped steps are only counted (log.jsonl, summary.json)" if n == _NOTED_SKIPS else ""
                self._warn(step, f"step {step}: gradient norm is {gnorm}; the optimizer step was skipped "
                                 f"(optim.on_nonfinite=skip){more}")
            return True
        bad = first_nonfinite_grad(self.named)
        where = (f"the first parameter with a non-finite gradient is '{bad}'" if bad
                 else "the non-finite gradient is in another rank's shard")
        ckpt = self.shared["ckpt"]
        last = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written yet"
        raise AudioMoEError(
            f"gradient norm became {gnorm} at step {step} (its optimizer step was not taken): {where}; {last}. "
            f"Fix what computes that gradient, lower the learning rate (lr={self.ospec.lr}), "
            "or skip such steps: --set optim.on_nonfinite=skip")

    def run(self) -> dict[str, Any]:
        """Run the stage to its last step; return its summary."""
        self._setup()
        r, st, dist, model = self.recipe, self.st, self.dist, self.model
        acc, t_stage = self.ospec.accumulation, time.perf_counter()
        local0 = int(self.state["step"]) - self.first if self.state is not None else 0
        cuda = dist.device.type == "cuda"
        sync = (lambda: torch.cuda.synchronize(dist.device)) if cuda else (lambda: None)
        if len(r.stages) > 1:
            self.bar.note(f"stage {self.idx} '{st.name}': steps {self.first + 1}..{self.first + st.steps}, "
                          f"{self.report['trainable_parameters']:,} trainable parameters")
        if self.sched.warmup_steps(st.steps) >= st.steps > 0:
            warn = (f"stage '{st.name}' warms the lr up over {self.sched.warmup_steps(st.steps)} steps but has {st.steps}: "
                    "the lr reaches its peak only at the end, if at all, and never decays (lower schedule.warmup)")
            self._warn(self.first, warn)
        # per-rank gradients of a sharded layout differ: the watch runs where every rank holds whole gradients
        watch = None if self.layout.sharded else ZeroGradWatch(model, self.named, st.name)
        for local in range(local0 + 1, st.steps + 1):
            step = self.first + local
            self.shared["step"] = step
            t0 = time.perf_counter()
            try:
                batches = [next(self.data) for _ in range(acc)]
            except StopIteration:
                raise AudioMoEError(f"the data ran out at step {step} of {self.first + st.steps}: give at least that many batches "
                                    "(x accumulation), or an endless iterator (itertools.cycle)") from None
            t_data, t_fwd, t_bwd = time.perf_counter() - t0, 0.0, 0.0
            self.opt.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=dist.device)
            terms: dict[str, float] = {}
            for j, batch in enumerate(batches):
                quiet = self.ddp.no_sync() if self.ddp is not model and j < acc - 1 else contextlib.nullcontext()
                with quiet:
                    t1 = time.perf_counter()
                    with autocast(r.precision, dist.device):
                        out = self.ddp(batch, predict=False)  # training never generates
                    if out.loss is None:
                        raise AudioMoEError("training batches must carry targets")
                    sync()
                    t2 = time.perf_counter()
                    (out.loss.float() / acc).backward()
                    sync()
                    t_fwd, t_bwd = t_fwd + t2 - t1, t_bwd + time.perf_counter() - t2
                self.shared["fed"].update(out.indices)
                loss_sum += out.loss.detach().float()
                for k, v in out.losses.items():
                    terms[k] = terms.get(k, 0.0) + float(v.detach()) / acc
                if r.log.routing_every and dist.main:
                    self.monitor.update(out.routing)
            if watch is not None:
                self._warn(step, watch.update({t for b in batches for t in b.task_list()}))
            loss = float(dist.mean(loss_sum / acc))
            self.shared["loss"] = loss
            if not math.isfinite(loss):  # checked before the optimizer step: the weights stay the last good step's
                last = f"; the last good checkpoint is {self.shared['ckpt']}" if self.shared["ckpt"] else ""
                raise AudioMoEError(f"loss became {loss} at step {step}; "
                                    f"lower the learning rate (lr={self.ospec.lr}){last}")
            t3 = time.perf_counter()
            gnorm = self.layout.clip(model, self.params, self.ospec.grad_clip)  # EP: expert grads reduced first
            # the norm is global (DDP-averaged, or reduced over the shards): every rank takes the same branch
            skipped = not math.isfinite(gnorm) and self._nonfinite(step, gnorm)
            lr = set_lr(self.opt, self.ospec.lr, lr_factor(local, st.steps, self.sched))
            if not skipped:
                self.opt.step()
            model.advance_schedules()  # aux-weight / noise schedules: once per optimizer step, never per forward
            sync()
            t_opt = time.perf_counter() - t3
            self.bar.step(step, loss, {k[5:]: v for k, v in terms.items() if k.startswith("task/")})
            if step % r.log.every == 0 or local == st.steps or skipped:
                self.log.step({"step": step, "stage": st.name, "stage_step": local, "loss": loss, "losses": terms, "lr": lr,
                               "grad_norm": None if skipped else gnorm,
                               "skipped": skipped, "skipped_steps": self.shared["skipped"],
                               "items": sum(len(b.task_list()) for b in batches) * dist.world,
                               "time": {"data": round(t_data, 6), "forward": round(t_fwd, 6), "backward": round(t_bwd, 6),
                                        "optimizer": round(t_opt, 6), "step": round(time.perf_counter() - t0, 6)}})
            if r.log.routing_every and dist.main and step % r.log.routing_every == 0 and out.routing:
                stats, warns = self.monitor.report(out.routing, out.routing_tasks(batches[-1].task_list()), model.task_names)
                self.log.routing(step, stats, warns)
                for w in warns:
                    self.bar.note(f"warning: {w}")
                self.shared.setdefault("warnings", []).extend({"step": step, "warning": w} for w in warns)
            at_eval = self.has_eval and (step % r.eval.every == 0 or local == st.steps)
            if at_eval and self.eval_data:  # rank 0, or every rank of a sharded run
                metrics = self._eval()
                self.shared["history"].append({"step": step, "train_loss": loss, **metrics})  # the step's training batch, not held out
                self.report["eval"] = metrics
                self.log.eval(step, metrics)
            every = r.checkpoint.every
            if self.root is not None and (at_eval or (every and step % every == 0) or local == st.steps):
                self._checkpoint(step, local)
        if callable(getattr(self.data, "summary", None)):
            self.shared["data_summary"] = self.data.summary()
        self.report.update(final_loss=self.shared["loss"], seconds=round(time.perf_counter() - t_stage, 2))
        return self.report
