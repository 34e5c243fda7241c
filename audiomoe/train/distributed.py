"""Processes and devices: DDP under torchrun (gloo on CPU, NCCL on CUDA), and ``--nproc N`` as torchrun's launcher.

``torchrun --nproc-per-node N -m audiomoe train ...`` sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; :func:`setup` reads them, picks the device
(``--device auto``: ``cuda:LOCAL_RANK`` when CUDA is there, else CPU) and joins the process group.
``audiomoe train --nproc N`` checks the run first (a configuration error never starts a process), then
re-runs the same command under torchrun's launcher on this host (:func:`launch`), which reports a
rank's failure once, in one line. Rank 0 writes logs and checkpoints; every rank reads its own data shard.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from audiomoe.core.errors import AudioMoEError
from audiomoe.train.failures import FAILURE_DIR_ENV, failure_report, write_agent_report


@dataclass
class Dist:
    """This process's place in the run: rank, world size, device, and whether a process group is up."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False
    owner: bool = False  # this run joined the group (and so leaves it); a nested run does not

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and checkpoints."""
        return self.rank == 0

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ``ok`` (a collective: every rank must call it)."""
        if not self.initialized:
            return ok
        t = torch.tensor([1 if ok else 0], device=self.comm_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item())

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live (NCCL needs CUDA tensors)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over ranks (identity in one process)."""
        if not self.initialized:
            return values
        t = values.detach().to(self.comm_device, torch.float64).clone()
        torch.distributed.all_reduce(t)
        return t / self.world

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """``[world, *values.shape]``: every rank's ``values`` (same shape and dtype on every rank)."""
        if not self.initialized:
            return values[None]
        v = values.to(self.comm_device)
        out = [torch.empty_like(v) for _ in range(self.world)]
        torch.distributed.all_gather(out, v)
        return torch.stack(out).cpu()

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.initialized:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group."""
        if self.initialized and self.owner:
            torch.distributed.destroy_process_group()
        self.initialized = False


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a device; ``cuda`` without CUDA is an error."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AudioMoEError(f"--device {choice}: CUDA is not available here; use --device cpu (or auto)")
        return torch.device(choice if ":" in choice else f"cuda:{local_rank}")
    raise AudioMoEError(f"--device {choice!r} must be auto, cpu, cuda or cuda:N")


def setup(device: str = "auto") -> Dist:
    """Read torchrun's environment and join the process group (one process: nothing to join)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if world <= 1:
        return Dist(0, 1, 0, dev, False)
    if torch.distributed.is_initialized():  # a caller (or a notebook) set it up already
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local, dev, True, False)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend, rank=rank, world_size=world, **({"device_id": dev} if dev.type == "cuda" else {})
    )
    return Dist(rank, world, local, dev, True, True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a single-host rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_AGENT = "import sys; from audiomoe.train.distributed import run_agent; sys.exit(run_agent(sys.argv[1:]))"


def launch(nproc: int, argv: Sequence[str], env: Optional[dict[str, str]] = None) -> int:
    """Run ``audiomoe <argv>`` in ``nproc`` processes on this host through torchrun's launcher; its exit code.

    A failure is reported once, here, as the one line ``audiomoe`` prints for it (exit 2 for a configuration
    error, 1 for anything else, 130 for Ctrl-C): each rank writes its line to a temporary folder instead of
    printing it (:mod:`.failures`), torchrun's agent runs without its log lines and traceback
    (:func:`run_agent`), and the line of the rank that failed first for its own reason is printed.
    """
    if not 1 <= nproc <= 4096:
        raise AudioMoEError(f"--nproc {nproc} must be in [1, 4096]")
    with tempfile.TemporaryDirectory(prefix="audiomoe-launch-") as tmp:
        cmd = [
            sys.executable,
            "-c",
            _AGENT,
            f"--nproc-per-node={nproc}",
            "--nnodes=1",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "audiomoe",
            *argv,
        ]
        env = {**os.environ, **(env or {}), FAILURE_DIR_ENV: tmp}
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        agent = subprocess.Popen(cmd, env=env)
        try:
            code = agent.wait()
        except KeyboardInterrupt:  # the agent and the ranks got Ctrl-C too: let them stop and say where they stopped
            try:
                code = agent.wait(timeout=120)
            finally:
                if agent.poll() is None:
                    agent.kill()
        if code == 0:
            return 0
        code, line = failure_report(Path(tmp), argv[0] if argv else "train", code)
        print(line, file=sys.stderr)
        return code


def run_agent(torchrun_args: Sequence[str]) -> int:
    """torchrun's launcher (``torch.distributed.run``) in this process, quiet: 0 when every rank succeeds, else 1
    (130 on Ctrl-C); how each failed rank ended goes to ``agent.json`` in the launch folder for :func:`launch`."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.disable(logging.CRITICAL)  # its warnings and errors repeat what the ranks say, in 40 lines
    out: dict[str, object] = {}
    code = 1
    try:
        run(parse_args(list(torchrun_args)))
        code = 0
    except ChildFailedError as exc:
        out["failures"] = {int(rank): int(f.exitcode) for rank, f in exc.failures.items()}
    except (SignalException, KeyboardInterrupt):
        out["interrupted"], code = True, 130
    except Exception as exc:  # noqa: BLE001 - a rendezvous or spawn failure: one line, by the launcher
        out["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    if out:
        write_agent_report(out)
    return code
