"""The distributed half of tests/train/test_mesh2d.py: ``torchrun --nproc_per_node 4`` (gloo, 127.0.0.1), EP 2 x DP 2.

Each rank lays a model out on the 2-D ``(dp, ep)`` mesh (:mod:`audiomoe.train.mesh2d`: expert blocks
FSDP-sharded over dp, the rest FSDP over all 4 ranks), trains it, gathers what it holds, and compares with a
one-process model trained on the 4 ranks' batches as one global batch (computed on the same rank). It writes
``rank<R>.json`` of measured differences and magnitudes; the pytest side holds the tolerances. Every
collective runs before any comparison, so a wrong value never leaves a rank waiting.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import audiomoe
from audiomoe.train import fsdp as parallel
from audiomoe.train.mesh2d import apply_2d

from helpers import expert_parallel_worker as W

EP = 2


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as the one-process tensor: unsharded over its FSDP mesh, experts gathered over ep."""
    experts = {n: s for n, _, s in parallel.expert_parameters(model)}
    out = {}
    for name, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad
        g = g.full_tensor() if isinstance(g, DTensor) else g
        if name in experts:
            parts = [torch.empty_like(g) for _ in range(EP)]
            dist.all_gather(parts, g.contiguous(), group=experts[name].group)
            g = torch.cat(parts)
        out[name] = g.detach().cpu()
    return out


def global_loss(loss: torch.Tensor) -> float:
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return float(loss) / dist.get_world_size()


def train(model, ref, data, rank: int, dtype, steps: int = 2) -> dict:
    """``steps`` AdamW steps of the 2-D ``model`` (this rank's batch) and of ``ref`` (every rank's batch, one process)."""
    world = dist.get_world_size()
    eps = 1e-8 if dtype == torch.float64 else 1e-6  # see expert_parallel_worker.train
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=eps)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, eps=eps)
    res: dict = {"losses": [], "ref_losses": [], "norms": [], "ref_norms": []}
    for step in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        b = data(step, rank, dtype)
        if isinstance(b, tuple):
            loss, pred = model(*b)
        else:
            loss, pred = model(b).loss, None
        loss.backward()
        parallel.reduce_expert_grads(model)
        if step == 0:
            grads = full_grads(model)  # before clipping: the raw mean gradient
        res["norms"].append(float(parallel.clip_grad_norm_(model, W.MAX_NORM)))
        res["losses"].append(global_loss(loss))
        ref_losses, ref_pred = [], None
        for r in range(world):
            rb = data(step, r, dtype)
            out = ref(*rb) if isinstance(rb, tuple) else (ref(rb).loss, None)
            ref_losses.append(out[0])
            if r == rank:
                ref_pred = out[1]
        (sum(ref_losses) / world).backward()
        if step == 0:
            want = {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in ref.named_parameters()}
            res["grad_diff"] = max(maxdiff(g, want[k]) for k, g in grads.items())
            res["grad_mag"] = max(float(g.abs().max()) for g in want.values())
            res["grad_keys_match"] = sorted(grads) == sorted(want)
            res["grads_compared"] = len(grads)
            if pred is not None:
                res["out_diff"] = maxdiff(pred, ref_pred)
                res["out_mag"] = float(ref_pred.detach().abs().max())
        res["ref_norms"].append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), W.MAX_NORM)))
        res["ref_losses"].append(float(sum(ref_losses)) / world)
        opt.step()
        ref_opt.step()
    full = parallel.full_state_dict(model)
    ref_sd = ref.state_dict()
    res["weight_diff"] = max(maxdiff(v, ref_sd[k]) for k, v in full.items())
    res["keys_match"] = sorted(full) == sorted(ref_sd)
    res["opt"], res["ref_opt"] = opt, ref_opt
    return res


def layout_facts(model: nn.Module) -> dict:
    """Which ranks share an expert block's all-to-all (ep) and its FSDP shards (dp), and what a rank stores."""
    name, p, shard = parallel.expert_parameters(model)[0]
    return {
        "ep_ranks": dist.get_process_group_ranks(shard.group),
        "dp_ranks": dist.get_process_group_ranks(p.device_mesh.get_group()),
        "expert_is_dtensor": all(isinstance(q, DTensor) for _, q, _ in parallel.expert_parameters(model)),
        "expert_global_shape": list(p.shape),
        "expert_local_shape": list(p.to_local().shape),
        "expert_name": name,
        "dense_is_dtensor": all(
            isinstance(q, DTensor) for n, q in model.named_parameters() if "experts." not in n or "shared" in n
        ),
    }


def tiny_case(rank: int, out_dir: str) -> dict:
    """W.Tiny (UniMoE blocks: top-p, null + gated shared experts, padding) at float64: train, save, reload."""
    from safetensors.torch import load_file

    dtype = torch.float64
    torch.manual_seed(0)
    ref = W.Tiny(1).to(dtype)
    model = W.Tiny(EP).to(dtype)
    model.load_state_dict(ref.state_dict())
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    mesh = apply_2d(model, EP)
    res = {"mesh": {"shape": list(mesh.shape), "names": list(mesh.mesh_dim_names)}, **layout_facts(model)}
    t = train(model, ref, W.tiny_batch, rank, dtype)
    res["moved"] = max(maxdiff(v, init[k]) for k, v in ref.state_dict().items())
    path = os.path.join(out_dir, "mesh2d.safetensors")
    parallel.save_full_safetensors(model, path)
    probe = W.batch(7 + rank, dtype=dtype)
    with torch.no_grad():
        mine = model(*probe)[1]
    fresh = W.Tiny(EP).to(dtype)  # the same 2-D layout rebuilt and loaded from the file
    apply_2d(fresh, EP)
    parallel.load_full_safetensors(fresh, path)
    full_opt = parallel.full_optimizer_state_dict(model, t["opt"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    parallel.load_full_optimizer_state_dict(fresh, fresh_opt, full_opt)
    again = parallel.full_optimizer_state_dict(fresh, fresh_opt)["state"]
    with torch.no_grad():
        reloaded = fresh(*probe)[1]
    # collectives done: one process, no EP, strict load of the file
    one = W.Tiny(1).to(dtype)
    one.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        one_out = one(*probe)[1]
    ref_opt = t["ref_opt"].state_dict()["state"]
    tensors = [(i, k, v) for i, e in full_opt["state"].items() for k, v in e.items() if torch.is_tensor(v)]
    res.update({k: v for k, v in t.items() if k not in ("opt", "ref_opt")})
    res.update(
        {
            "one_process_diff": maxdiff(one_out, mine),
            "reload_diff": maxdiff(reloaded, mine),
            "probe_mag": float(mine.abs().max()),
            "opt_diff": max(maxdiff(v, ref_opt[i][k]) for i, k, v in tensors),
            "opt_entries": len(full_opt["state"]),
            "ref_opt_entries": len(ref_opt),
            "opt_roundtrip": max(maxdiff(v, again[i][k]) for i, k, v in tensors),
            "file_expert_shape": list(load_file(path)[res["expert_name"]].shape),
        }
    )
    return res


def audio_batch(step: int, r: int, dtype):
    """Ranks 0, 2 feed only the emotion head, ranks 1, 3 only the speaker head (each rank leaves one head unused)."""
    g = torch.Generator().manual_seed(100 * step + r)
    task = ["emotion", "speaker"][r % 2]
    return audiomoe.AudioBatch(
        waveforms=torch.randn(2, 4000, generator=g, dtype=dtype),
        sample_rate=16000,
        tasks=[task, task],
        lengths=torch.tensor([4000, 2500 + 500 * r]),
        targets=[1 + r % 2, 3],
    )


def composed_case(rank: int) -> dict:
    """``tiny-unimoe`` at EP 2 through the recipe layout (:class:`Layout`, meta-device init) vs the CPU build."""
    from audiomoe.core.composer import build_model, resolve
    from audiomoe.train.layout import Layout

    layout = Layout(world=dist.get_world_size(), expert_parallel=EP, fsdp=True, meta_init=True)
    spec = resolve("tiny-unimoe")
    ref = build_model(spec)  # the seeded one-process build
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    model = layout.build_sharded(resolve(layout.build_spec(spec.to_dict())), torch.device("cpu"))
    res = {"mesh_2d": layout.mesh_2d, **layout_facts(model)}
    full = parallel.full_state_dict(model)
    res["init_diff"] = max(maxdiff(v, init[k]) for k, v in full.items())
    res["init_keys_match"] = sorted(full) == sorted(init)
    t = train(model, ref, audio_batch, rank, torch.float32)
    res.update({k: v for k, v in t.items() if k not in ("opt", "ref_opt")})
    res["moved"] = max(maxdiff(v, init[k]) for k, v in ref.state_dict().items())
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="tiny,composed")
    args = ap.parse_args()
    rank = W.start_gloo()
    res: dict = {}
    if "tiny" in args.only.split(","):
        res["tiny"] = tiny_case(rank, args.out)
    if "composed" in args.only.split(","):
        res["composed"] = composed_case(rank)
    W.finish_rank(args.out, rank, res)


if __name__ == "__main__":
    main()
