"""The sharded-optimizer half of tests/train/test_meta_init.py: run by ``torchrun --nproc_per_node 2`` (gloo, 127.0.0.1).

Per layout, each rank trains today's sharded model two AdamW steps, rank 0 writes a checkpoint of the gathered
one-process states (``save_checkpoint``, as the trainer does), then a fresh meta-built model reads its rows
(``load_shards``) and its optimizer reads only its rows of the stored moments (``load_trainer_state(...,
lazy_optimizer=True)`` + ``load_full_optimizer_state_dict``). It writes ``rank<R>.json`` of differences against
the live model and optimizer (before and after one more step); the pytest side judges them.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist

from audiomoe.core.composer import build_meta, build_model, resolve
from audiomoe.train import fsdp as parallel
from audiomoe.train.checkpoint import load_trainer_state, save_checkpoint
from audiomoe.train.meta_init import load_shards
from audiomoe.train.meta_shards import StoredTensor

from helpers.expert_parallel_worker import finish_rank, start_gloo
from helpers.meta_init_worker import LAYOUTS, backward, shard


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def step(model, opt, rank: int, n: int) -> float:
    """One AdamW step on this rank's batch ``n`` (gradients reduced as the trainer's layout does)."""
    opt.zero_grad()
    loss = backward(model, rank, n)
    opt.step()
    return float(loss)


def opt_diff(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> tuple[float, int, int]:
    """``(max difference of the local moments, local state bytes, tensors whose layout differs)``."""
    diff, nbytes, bad = 0.0, 0, 0
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    for idx, entry in sa.items():
        for key, v in entry.items():
            w = sb[idx][key]
            if (
                type(v) is not type(w)
                or v.shape != w.shape
                or getattr(v, "placements", None) != getattr(w, "placements", None)
            ):
                bad += 1
                continue
            lv, lw = _local(v), _local(w)
            diff = max(diff, float((lv.double() - lw.double()).abs().max()) if lv.numel() else 0.0)
            nbytes += lv.numel() * lv.element_size()
    return diff, nbytes, bad


def run(rank: int, out: str, preset: str) -> dict:
    res = {}
    for name, (ep, fsdp) in LAYOUTS.items():
        spec = resolve(preset, [f"backbone.moe.expert_parallel={ep}"] if ep > 1 else [])
        today = shard(build_model(spec), ep, fsdp)
        today.spec = resolve(preset).to_dict()
        opt = torch.optim.AdamW(today.parameters(), lr=1e-2, eps=1e-6)
        for n in range(2):
            step(today, opt, rank, n)
        model_state = parallel.full_state_dict(today, rank0_only=True)
        opt_state = parallel.full_optimizer_state_dict(today, opt, rank0_only=True)
        root = os.path.join(out, name)
        if rank == 0:
            save_checkpoint(today, root, 2, opt, model_state=model_state, optimizer_state=opt_state)
        dist.barrier()
        ckpt = os.path.join(root, "step-000002")
        fresh = shard(build_meta(spec), ep, fsdp)
        load_shards(fresh, os.path.join(ckpt, "model.safetensors"))
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, eps=1e-6)
        saved = load_trainer_state(ckpt, lazy_optimizer=True)["optimizer"]
        stored = [v for e in saved["state"].values() for v in e.values()]
        parallel.load_full_optimizer_state_dict(fresh, fresh_opt, saved)
        diff, local_bytes, bad = opt_diff(opt, fresh_opt)
        full_bytes = sum(math.prod(v.shape) * v.dtype.itemsize for v in stored)
        loss = [step(today, opt, rank, 2), step(fresh, fresh_opt, rank, 2)]
        after = opt_diff(opt, fresh_opt)
        a, b = parallel.full_state_dict(today), parallel.full_state_dict(fresh)
        res[name] = {
            "all_stored": all(isinstance(v, StoredTensor) for v in stored) and len(stored) > 0,
            "opt_diff": diff,
            "layout_mismatch": bad,
            "local_state_bytes": local_bytes,
            "full_state_bytes": full_bytes,
            "loss": loss,
            "opt_diff_after": after[0],
            "weight_diff_after": max(float((a[k].double() - b[k].double()).abs().max()) for k in a),
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="tiny-unimoe")
    args = ap.parse_args()
    rank = start_gloo(timeout_s=300)
    finish_rank(args.out, rank, run(rank, args.out, args.preset))


if __name__ == "__main__":
    main()
