"""The distributed half of tests/train/test_meta_init.py: run by ``torchrun --nproc_per_node 2`` (gloo, 127.0.0.1).

Each rank builds the same model twice at the same layout: today's way (``build_model`` on CPU under the
spec seed, then ``shard_experts`` / ``apply_fsdp``) and the meta way (``record_build`` on the meta device,
shard, ``materialize``), trains both two AdamW steps on its own batches, saves the first, and loads that file
into a third meta-built model through ``load_shards``. It writes ``rank<R>.json`` of differences, byte counts
and its peak resident memory (``VmHWM``); the pytest side judges them.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from audiomoe.core.composer import build_meta, build_model, resolve
from audiomoe.train import fsdp as parallel
from audiomoe.train.meta_init import load_shards, materialize, record_build

from helpers.expert_parallel_worker import finish_rank, start_gloo

LAYOUTS = {"ep2": (2, False), "ep2_fsdp": (2, True), "fsdp": (1, True)}


def vm_hwm_kib() -> int:
    """This process's peak resident set (``VmHWM``), KiB."""
    with open("/proc/self/status", encoding="utf-8") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def shard(model, ep: int, fsdp: bool):
    if ep > 1:
        parallel.shard_experts(model)
    if fsdp:
        parallel.apply_fsdp(model)
    return model


def batch(step: int, rank: int):
    import audiomoe

    g = torch.Generator().manual_seed(100 * step + rank)
    return audiomoe.AudioBatch(
        waveforms=torch.randn(2, 4000, generator=g),
        sample_rate=16000,
        tasks=["emotion", "emotion"],
        lengths=torch.tensor([4000, 2500 + 500 * rank]),
        targets=[1 + rank, 3],
    )


def backward(model, rank: int, n: int) -> torch.Tensor:
    """Loss and backward of this rank's batch ``n``, gradients reduced as the trainer's layout does; returns the loss."""
    loss = model(batch(n, rank)).loss
    loss.backward()
    experts = {id(p) for _, p, _ in parallel.expert_parameters(model)}
    for p in model.parameters():
        if p.grad is None and p.requires_grad:
            p.grad = torch.zeros_like(p)
        if id(p) not in experts and p.grad is not None and not hasattr(p.grad, "to_local"):
            dist.all_reduce(p.grad)  # EP without FSDP: the replicated parameters' mean gradient, as DDP's
            p.grad.div_(dist.get_world_size())
    parallel.reduce_expert_grads(model)
    return loss


def train(model, rank: int, steps: int = 2) -> tuple[list[float], list[float]]:
    """Two AdamW steps; ``(losses, global grad norms)`` (the model is EP/FSDP-sharded: collective)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)
    losses, norms = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = backward(model, rank, step)
        norms.append(float(parallel.clip_grad_norm_(model, 1e9)))
        opt.step()
        losses.append(float(loss))
    return losses, norms


def full(model) -> dict:
    """The one-process state as copies (``full_state_dict`` returns views of unsharded CPU parameters)."""
    return {k: v.clone() for k, v in parallel.full_state_dict(model).items()}


def maxdiff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def compare(rank: int, out: str, preset: str) -> dict:
    res = {}
    for name, (ep, fsdp) in LAYOUTS.items():
        spec = resolve(preset, [f"backbone.moe.expert_parallel={ep}"] if ep > 1 else [])
        today = shard(build_model(spec), ep, fsdp)
        meta, program = record_build(spec)
        shard(meta, ep, fsdp)
        stats = materialize(meta, program)
        init_today, init_meta = full(today), full(meta)
        lt, nt = train(today, rank)
        lm, nm = train(meta, rank)
        after_today, after_meta = full(today), full(meta)
        path = os.path.join(out, f"{name}.safetensors")
        parallel.save_full_safetensors(today, path)
        fresh = shard(build_meta(spec), ep, fsdp)
        loaded = load_shards(fresh, path)
        again = full(fresh)
        lt2, _ = train(today, rank, 1)  # one more step from the saved weights: the reloaded model follows it
        lf2, _ = train(fresh, rank, 1)
        res[name] = {
            "keys_match": sorted(init_today) == sorted(init_meta),
            "init_diff": maxdiff(init_today, init_meta),
            "loss_today": lt,
            "loss_meta": lm,
            "norm_today": nt,
            "norm_meta": nm,
            "weight_diff": maxdiff(after_today, after_meta),
            "moved": maxdiff(after_today, init_today),
            "reload_diff": maxdiff(after_today, again),
            "reload_loss": [lt2[0], lf2[0]],
            "local_bytes": stats["bytes"],
            "full_bytes": sum(v.numel() * v.element_size() for v in init_today.values()),
            "replay_peak": stats["replay_peak"],
            "read_bytes": loaded["read"],
            "loaded_bytes": loaded["bytes"],
            "file_bytes": os.path.getsize(path),
        }
    return res


def memory(kind: str, preset: str, overrides: list[str], ep: int, fsdp: bool, ckpt: str) -> dict:
    """Build one model the ``kind`` way (``today`` / ``meta`` / ``resume``) and report this process's peak memory."""
    spec = resolve(preset, overrides + ([f"backbone.moe.expert_parallel={ep}"] if ep > 1 else []))
    # every kind loads the libraries a build imports on first use (transformers, DTensor, dispatch modes)
    # before the mark, as benchmarks/meta_init.py does: the figure is the build's memory, not import cost
    warm, prog = record_build(resolve("tiny-cls"))
    materialize(warm, prog)
    del warm, prog
    base = vm_hwm_kib()
    if kind == "today":
        model = shard(build_model(spec), ep, fsdp)
    elif kind == "meta":
        model, program = record_build(spec)
        shard(model, ep, fsdp)
        materialize(model, program)
        del program
    else:
        model = shard(build_meta(spec), ep, fsdp)
        load_shards(model, ckpt)
    local = sum(  # DTensor.numel() is the global count: the local shard's
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters()
    )
    return {"kind": kind, "peak_kib": vm_hwm_kib(), "start_kib": base, "local_param_bytes": local}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="compare")  # compare | memory
    ap.add_argument("--preset", default="tiny-unimoe")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--kind", default="meta")
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--ckpt", default="")
    args = ap.parse_args()
    rank = start_gloo(timeout_s=300)
    if args.only == "compare":
        res = compare(rank, args.out, args.preset)
    else:
        res = memory(args.kind, args.preset, args.set, args.ep, args.fsdp, args.ckpt)
    finish_rank(args.out, rank, res)


if __name__ == "__main__":
    main()
