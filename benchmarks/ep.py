"""Expert-parallel MoE layer on 2 CPU ranks (gloo, 127.0.0.1): all-to-all volume and time per step, and the
share of the layer's time spent communicating.

UniMoE-Audio trained with EP 4 on DeepSpeed-MoE; torchtitan runs EP with the same two exchanges (counts,
then token rows with variable splits). Per case, each rank holds ``tokens`` of its own; one step is the
layer's forward + backward (router included) with ``moe.expert_parallel=2`` after ``shard_experts``
(each rank holds E/2 experts), side by side with the same layer unsharded on the same tokens (every
expert local: the one-process baseline), interleaved, medians over repetitions, slowest rank reported.
Volume counts the four token exchanges (dispatch and combine, forward and backward) and the counts
exchange; ``off-rank`` is what left the rank (rows for its own experts stay). Communication time is the
wall time inside ``all_to_all_single`` (on CPU it includes waiting for the other rank).

On a lent GPU the issue also asks for FSDP2 + bf16 step time on ``unimoe-audio-tiny`` against DDP: not
measured here (no CUDA device); the script says so.

``--quick``: d 256, 1024 tokens per rank, 3 repetitions; ``--smoke``: d 32, 64 tokens per rank, 1 repetition
(the same 2 gloo ranks, both cases, the same exchanges: seconds).

Usage: python benchmarks/ep.py [--quick | --smoke] [--json FILE] [--reps N]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BENCH = "ep"
TOPK = {"name": "top_k", "params": {"k": 2}}
TOPP = {"name": "top_p", "params": {"p": 0.7}}


#: (d_model, d_ff, tokens per rank) per run size
SIZES = {"full": (512, 1024, 4096), "quick": (256, 512, 1024), "smoke": (32, 64, 64)}


def cases(mode: str) -> tuple[list[tuple[str, dict, int, int]], int]:
    """``([(label, moe params, d_model, tokens per rank)], d_ff)`` for the run size ``mode``."""
    d, f, t = SIZES[mode]
    return [
        (f"top-2 E=8 d={d} f={f} T={t}", {"router": TOPK, "num_experts": 8}, d, t),
        (
            f"unimoe top-p E=8+1null+2sh d={d} T={t}",
            {
                "router": TOPP,
                "num_experts": 8,
                "num_null": 1,
                "num_shared": 2,
                "shared_mode": "gated",
                "shared_d_ff": f // 2,
            },
            d,
            t,
        ),  # fmt: skip
    ], f


def build(spec: dict, d: int, f: int, ep: int) -> torch.nn.Module:
    """The registered ``moe`` layer of ``spec`` with SwiGLU experts of width ``f`` and ``expert_parallel=ep``."""
    import audiomoe

    params = {**spec, "expert": {"name": "swiglu", "params": {"d_ff": f}}, "expert_parallel": ep}
    return audiomoe.component_builder("moe", {"name": "moe", "params": params})(d_model=d)


def worker(rank: int, port: int, mode: str, reps: int, queue) -> None:
    """One gloo rank: time EP and unsharded steps per case; rank 0 puts the slowest rank's medians on ``queue``."""
    from audiomoe.moe.expert_parallel import record_comm
    from audiomoe.train import fsdp as parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))
    rows = []
    specs, f = cases(mode)
    for label, spec, d, t in specs:
        torch.manual_seed(0)
        local = build(spec, d, f, 1)
        ep = build(spec, d, f, 2)
        ep.load_state_dict(local.state_dict())
        parallel.shard_experts(ep)
        x = torch.randn(t, d, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
        g = torch.randn(t, d, generator=torch.Generator().manual_seed(10 + rank))

        def step(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
            x.grad = None
            y, _ = layer(x)
            (y * g).sum().backward()

        samples = {"ep": [], "local": [], "comm": [], "bytes": [], "off": []}
        for i in range(reps + 1):  # the first round warms up
            for name, layer in (("ep", ep), ("local", local)):
                dist.barrier()  # both ranks start together: the exchange times are not skewed by the other's backlog
                with record_comm() as st:
                    t0 = time.perf_counter()
                    step(layer, x, g)
                    dt = time.perf_counter() - t0
                if i:
                    samples[name].append(dt)
                    if name == "ep":
                        samples["comm"].append(st.seconds)
                        samples["bytes"].append(st.bytes_sent)
                        samples["off"].append(st.bytes_off_rank)
        med = {k: statistics.median(v) for k, v in samples.items()}
        slow = torch.tensor([med["ep"], med["local"], med["comm"], med["bytes"], med["off"]], dtype=torch.float64)
        dist.all_reduce(slow, op=dist.ReduceOp.MAX)
        pairs = ep.last_stats["routed_pairs"]
        rows.append((label, *slow.tolist(), pairs, t))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import Report, add_mode_flags, mode_of

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mode_flags(ap, "reduced sizes and repetitions (< 1 minute), same code paths")
    ap.add_argument("--json", metavar="FILE", help="also write JSON lines here")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (median reported)")
    args = ap.parse_args()
    mode = mode_of(args)
    reps = args.reps or {"full": 7, "quick": 3, "smoke": 1}[mode]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(worker, args=(_free_port(), mode, reps, queue), nprocs=2, start_method="spawn")
    rows = queue.get()
    report = Report(BENCH, mode, device="cpu x2 ranks (gloo)")
    report.lines[0]["threads"] = 1  # per rank
    print(f"torch {torch.__version__}, 2 gloo ranks on 127.0.0.1, 1 thread each, float32; EP 2 vs the same layer unsharded; "
          f"fwd+bwd per step, medians of {reps}, slowest rank")  # fmt: skip
    print(
        f"{'case':<40} {'pairs':>6} {'a2a MB':>8} {'off-rank MB':>11} {'EP ms':>8} {'comm ms':>8} {'comm share':>10} {'local ms':>9} {'EP/local':>9}"
    )
    for label, t_ep, t_local, t_comm, nbytes, off, pairs, _tokens in rows:
        print(f"{label:<40} {pairs:>6} {nbytes / 1e6:>8.2f} {off / 1e6:>11.2f} {t_ep * 1e3:>8.1f} {t_comm * 1e3:>8.1f} "
              f"{100 * t_comm / t_ep:>9.1f}% {t_local * 1e3:>9.1f} {t_ep / t_local:>8.2f}x")  # fmt: skip
        emit = report.emit
        emit(label, "a2a_bytes_per_step", nbytes, "bytes")
        emit(label, "a2a_off_rank_bytes_per_step", off, "bytes")
        emit(label, "ep_step_time", t_ep * 1e3, "ms")
        emit(label, "comm_time", t_comm * 1e3, "ms")
        emit(label, "comm_share", t_comm / t_ep, "fraction")
        emit(label, "local_step_time", t_local * 1e3, "ms")
        emit(label, "ep_over_local", t_ep / t_local, "x")
    print("\nno CUDA device: FSDP2 + bf16 vs DDP step time on unimoe-audio-tiny skipped (needs a GPU)" if not torch.cuda.is_available()
          else "\nCUDA present: the FSDP2 + bf16 vs DDP comparison is not part of this CPU script")  # fmt: skip
    report.write(args.json)


if __name__ == "__main__":
    main()
