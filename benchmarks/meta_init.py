"""Peak host memory per rank of building a sharded model: today's CPU build vs meta init (issue 28).

Two gloo ranks on 127.0.0.1 (``torch.multiprocessing`` spawn, a fresh pair per measurement: a process's
high-water mark never goes down). Each rank builds ``tiny-unimoe`` at a size where the weights dominate
(full: d_model 768, 4 UniMoE blocks of 8 routed SwiGLU experts of d_ff 1536, ~480 MB float32) the way named:

- ``today``: ``build_model`` on CPU (the full model on every rank), then ``shard_experts`` / ``apply_fsdp``;
- ``meta``: ``record_build`` on the meta device, shard, ``materialize`` this rank's shards of the seeded init
  (the same values as ``today``, checked: the gathered state dicts are equal);
- ``resume``: ``build_meta``, shard, ``load_shards`` from the full safetensors file ``today`` wrote.

Reported per layout and kind: the slowest rank's ``VmHWM`` (``/proc/self/status``) in total and added by the
build (minus the mark after imports and the process group), and ``meta`` / ``resume`` over ``today``; beside it
the file-backed (``RssFile``) and anonymous (``RssAnon``) resident memory gained by the end of the build: the
checkpoint is read with plain reads, not a memory map, so ``file`` stays ~0 and ``VmHWM`` counts anonymous memory.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Report, add_mode_flags, mode_of  # noqa: E402 - benchmarks are scripts, run from anywhere

BENCH = "meta_init"
SIZES = {
    "full": ["d_model=768", "backbone.num_layers=4", "backbone.moe.expert.d_ff=1536", "backbone.moe.shared_d_ff=768"],
    "quick": ["d_model=512", "backbone.num_layers=4", "backbone.moe.expert.d_ff=1024", "backbone.moe.shared_d_ff=512"],
    "smoke": [],
}
LAYOUTS = {"EP 2 + FSDP2": (2, True), "EP 2 (DDP)": (2, False), "FSDP2": (1, True)}


def _status(field: str = "VmHWM") -> int:
    """A ``/proc/self/status`` memory field in bytes: ``VmHWM`` (peak resident), ``RssAnon``, ``RssFile`` (now)."""
    with open("/proc/self/status", encoding="utf-8") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(f"{field}:")) * 1024


def _hwm() -> int:
    return _status("VmHWM")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, kind: str, sets: list, ep: int, fsdp: bool, ckpt: str, queue) -> None:
    """One rank: build the named way, report ``(rank, start, peak, local bytes, full-state checksum)``."""
    import torch.distributed as dist

    from audiomoe.core.composer import build_meta, build_model, resolve
    from audiomoe.train import fsdp as parallel
    from audiomoe.train.meta_init import load_shards, materialize, record_build

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=600))
    spec = resolve("tiny-unimoe", sets + ([f"backbone.moe.expert_parallel={ep}"] if ep > 1 else []))

    def shard(m):
        if ep > 1:
            parallel.shard_experts(m)
        if fsdp:
            parallel.apply_fsdp(m)
        return m

    # the libraries each path imports on first use (transformers, DTensor, dispatch modes) load before the mark
    warm, prog = record_build(resolve("tiny-cls"))
    materialize(warm, prog)
    del warm, prog
    start, file0, anon0 = _hwm(), _status("RssFile"), _status("RssAnon")
    if kind == "today":
        model = shard(build_model(spec))
    elif kind == "meta":
        model, program = record_build(spec)
        shard(model)
        materialize(model, program)
        del program
    else:
        model = shard(build_meta(spec))
        load_shards(model, ckpt)
    peak, file1, anon1 = _hwm(), _status("RssFile"), _status("RssAnon")
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters())
    if kind == "today":
        parallel.save_full_safetensors(model, ckpt)  # after the mark: the file the resume case reads
    # the gathered state (after the mark: it allocates the full model) must be equal across kinds
    check = sum(float(v.double().sum()) for v in parallel.full_state_dict(model, rank0_only=True).values())
    queue.put((rank, start, peak, local, check, file1 - file0, anon1 - anon0))
    dist.barrier()
    dist.destroy_process_group()


def run_pair(kind: str, sets: list, ep: int, fsdp: bool, ckpt: str) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(worker, args=(_free_port(), kind, sets, ep, fsdp, ckpt, queue), nprocs=2, start_method="spawn")
    rows = sorted(queue.get() for _ in range(2))
    return {
        "added": max(r[2] - r[1] for r in rows),
        "total": max(r[2] for r in rows),
        "local": max(r[3] for r in rows),
        "check": rows[0][4],
        "file": max(r[5] for r in rows),  # file-backed resident pages (a memory map would show here) gained
        "anon": max(r[6] for r in rows),  # anonymous resident memory held after the build
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_mode_flags(ap, "d_model 512 (~150 MB of weights)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    mode = mode_of(args)
    sets = SIZES[mode]
    report = Report(BENCH, mode, device="cpu x2 ranks (gloo)")
    report.lines[0]["threads"] = 1
    layouts = LAYOUTS if mode != "smoke" else {"EP 2 + FSDP2": LAYOUTS["EP 2 + FSDP2"]}
    print(f"torch {torch.__version__}, 2 gloo ranks on 127.0.0.1, tiny-unimoe {' '.join(sets) or '(preset size)'}; "
          "peak host memory per rank (VmHWM, slowest rank): added by the build / total")  # fmt: skip
    print(f"{'layout':<14} {'kind':<7} {'full MB':>8} {'local MB':>9} {'added MB':>9} {'total MB':>9} {'added/today':>12} {'total/today':>12} {'file MB':>8} {'anon MB':>8}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for label, (ep, fsdp) in layouts.items():
            ckpt = os.path.join(tmp, "model.safetensors")
            res = {kind: run_pair(kind, sets, ep, fsdp, ckpt) for kind in ("today", "meta", "resume")}
            full = os.path.getsize(ckpt)
            for kind, r in res.items():
                if abs(r["check"] - res["today"]["check"]) > 1e-6 * max(1.0, abs(res["today"]["check"])):
                    raise SystemExit(f"{label} {kind}: the built weights differ from today's build")
                ra, rt = r["added"] / res["today"]["added"], r["total"] / res["today"]["total"]
                print(f"{label:<14} {kind:<7} {full / 2**20:>8.1f} {r['local'] / 2**20:>9.1f} {r['added'] / 2**20:>9.1f} "
                      f"{r['total'] / 2**20:>9.1f} {ra:>11.2f}x {rt:>11.2f}x {r['file'] / 2**20:>8.1f} {r['anon'] / 2**20:>8.1f}")  # fmt: skip
                report.emit(f"{label} {kind}", "peak_added", r["added"], "bytes")
                report.emit(f"{label} {kind}", "peak_total", r["total"], "bytes")
                report.emit(f"{label} {kind}", "rss_file_gained", r["file"], "bytes")
                if kind != "today":
                    report.emit(f"{label} {kind}", "added_over_today", ra, "x")
                    report.emit(f"{label} {kind}", "total_over_today", rt, "x")
    report.write(args.json)


if __name__ == "__main__":
    main()
