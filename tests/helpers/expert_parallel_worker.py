"""The distributed half of tests/moe/test_expert_parallel.py: run by ``torchrun --nproc_per_node 2`` (gloo, 127.0.0.1).

Each rank runs every scenario, compares against one-process references computed on the same rank from
the same full weights, and writes ``rank<R>.json`` of measured differences and magnitudes (the pytest
side holds the tolerances). All collectives run before any comparison, so a wrong value never leaves a
rank waiting. Reference for the layout: UniMoE-Audio (EP 4 on DeepSpeed-MoE), torchtitan (FSDP2 + EP).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist
from torch import nn

import audiomoe
from audiomoe.moe.expert_parallel import record_comm
from audiomoe.train import fsdp as parallel

D, E = 8, 4
TOPK = {"name": "top_k", "params": {"k": 2}}
TOPP = {"name": "top_p", "params": {"p": 0.6}}
LAYER_CASES = {
    "topk": dict(router=TOPK),
    "topk_shared_null": dict(router=TOPK, num_null=1, num_shared=2, shared_mode="gated"),
    "topp_shared_null": dict(router=TOPP, num_null=1, num_shared=2, shared_mode="gated"),
    "topp_unit_mlp": dict(router=TOPP, expert="mlp", num_null=2, num_shared=1, shared_mode="unit"),
    "topp_loop": dict(router=TOPP, num_null=1, dispatch="loop"),
    "topk_capacity": dict(
        router=TOPK, num_null=1, num_shared=1, capacity_factor=0.6, drop_policy="probs", renormalize_drops=True
    ),
    "rank1_all_padding": dict(router=TOPP, num_null=1, num_shared=1),
}


def moe_spec(router, expert="swiglu", ep=1, **kw) -> dict:
    return {
        "name": "moe",
        "params": {
            "router": router,
            "expert": {"name": expert, "params": {"d_ff": 8}},
            "num_experts": E,
            "expert_parallel": ep,
            **kw,
        },
    }


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


def batch(seed: int, all_padded: bool = False, dtype=torch.float64):
    """``(x [2, 6, D], padding_mask [2, 6], target [2, 6, 3])``, different lengths per seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, D, generator=g, dtype=dtype)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 6 - 1 - seed % 3 :] = True
    if all_padded:
        pad[:] = True
    return x, pad, torch.randn(2, 6, 3, generator=g, dtype=dtype)


def expert_slice(name: str, ref_params: dict, shard) -> torch.Tensor:
    """The reference tensor of a local expert parameter: a block of the stacked tensor, or expert lo + i."""
    pre, rest = name.split("experts.", 1)
    if rest in ("gate_up_proj", "down_proj"):
        return ref_params[name][shard.lo : shard.hi]
    i, tail = rest.split(".", 1)
    return ref_params[f"{pre}experts.{shard.lo + int(i)}.{tail}"]


def layer_case(name: str, cfg: dict, rank: int) -> dict:
    cfg = dict(cfg)
    router, expert = cfg.pop("router"), cfg.pop("expert", "swiglu")
    torch.manual_seed(0)
    ref = audiomoe.component_builder("moe", moe_spec(router, expert, 1, **cfg))(d_model=D).double()
    ep = audiomoe.component_builder("moe", moe_spec(router, expert, 2, **cfg))(d_model=D).double()
    ep.load_state_dict(ref.state_dict())
    parallel.shard_experts(ep)
    full_sd_diff = max(maxdiff(v, ref.state_dict()[k]) for k, v in parallel.full_state_dict(ep).items())
    keys_match = sorted(parallel.full_state_dict(ep)) == sorted(ref.state_dict())
    data = [batch(10 + r, all_padded=(name == "rank1_all_padding" and r == 1)) for r in range(2)]
    out_grads = [
        torch.randn(2, 6, D, generator=torch.Generator().manual_seed(20 + r), dtype=torch.float64) for r in range(2)
    ]
    x = data[rank][0].clone().requires_grad_(True)
    with record_comm() as st:
        y, routing = ep(x, data[rank][1])
        ((y * out_grads[rank]).sum() + sum(routing.aux_losses.values())).backward()
    sent_rows = st.per_call[1][0] // (D * 8)  # the forward token exchange (after the counts)
    valid = ~data[rank][1].reshape(-1)
    null_picks = int((routing.mask[:, E:] & valid[:, None]).sum())
    routed_pairs = ep.last_stats["routed_pairs"]
    # reference: the full layer on each rank's tokens, losses summed (an expert sees both ranks' tokens)
    ref_x, ref_y = [], []
    for r in range(2):
        xr = data[r][0].clone().requires_grad_(True)
        yr, rr = ref(xr, data[r][1])
        ((yr * out_grads[r]).sum() + sum(rr.aux_losses.values())).backward()
        ref_x.append(xr)
        ref_y.append(yr.detach())
    ref_g = {k: p.grad for k, p in ref.named_parameters()}
    ex = {n: s for n, _, s in parallel.expert_parameters(ep)}
    grad_diff, grad_mag, n_expert = 0.0, 0.0, 0
    local = {}
    for k, p in ep.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        if k not in ex:
            dist.all_reduce(g)  # a replicated parameter's gradient is each rank's share
        local[k] = g
    for k, g in local.items():
        want = expert_slice(k, ref_g, ex[k]) if k in ex else ref_g[k]
        want = torch.zeros_like(g) if want is None else want
        n_expert += k in ex
        grad_diff, grad_mag = max(grad_diff, maxdiff(g, want)), max(grad_mag, float(want.abs().max()))
    return {
        "out_diff": maxdiff(y, ref_y[rank]),
        "out_mag": float(ref_y[rank].abs().max()),
        "xgrad_diff": maxdiff(x.grad, ref_x[rank].grad),
        "xgrad_mag": float(ref_x[rank].grad.abs().max()),
        "grad_diff": grad_diff,
        "grad_mag": grad_mag,
        "expert_params": n_expert,
        "params": len(local),
        "full_sd_diff": full_sd_diff,
        "full_sd_keys_match": keys_match,
        "sent_rows": int(sent_rows),
        "routed_pairs": int(routed_pairs),
        "null_picks": null_picks,
        "valid_tokens": int(valid.sum()),
        "padded_out_max": float(y.detach().reshape(-1, D)[~valid].abs().max()) if (~valid).any() else 0.0,
        "local_experts": ep.ep_shard.local,
        "dropped_pairs": int(ep.last_stats["dropped_pairs"]),
    }


class Tiny(nn.Module):
    """A UniMoE backbone (top-p, 4 routed + 1 null + 2 gated shared experts per block) and a linear readout."""

    def __init__(self, ep: int) -> None:
        super().__init__()
        moe = moe_spec(TOPP, "swiglu", ep, num_null=1, num_shared=2, shared_mode="gated")
        self.backbone = audiomoe.component_builder(
            "backbone", {"name": "unimoe_transformer", "params": {"num_layers": 2, "num_heads": 2, "moe": moe}}
        )(d_model=D)
        self.head = nn.Linear(D, 3)

    def forward(self, x, pad, target):
        out = self.backbone(x, pad)
        pred = self.head(out.hidden)
        ct = torch.promote_types(pred.dtype, torch.float32)  # bf16 compute: the loss in fp32
        loss = (pred.to(ct) - target.to(ct)).square()[~pad].mean() + sum(out.aux_losses.values())
        return loss, pred


MAX_NORM = 0.05  # small enough that clipping acts on every step (the norm is reported)


def tiny_batch(step: int, r: int, dtype):
    return batch(100 * step + r, dtype=dtype)


def composed(ep: int) -> nn.Module:
    """The ``tiny-unimoe`` preset (conv front-end, 2 UniMoE blocks of 8 routed + 1 null + 2 shared, two heads) at EP ``ep``."""
    return audiomoe.compose("tiny-unimoe", overrides=[f"backbone.moe.expert_parallel={ep}"])


def audio_batch(step: int, r: int, dtype):
    """Rank 0 feeds only the emotion head, rank 1 only the speaker head (each rank leaves one head unused)."""
    g = torch.Generator().manual_seed(100 * step + r)
    task = ["emotion", "speaker"][r]
    return audiomoe.AudioBatch(
        waveforms=torch.randn(2, 4000, generator=g, dtype=dtype),
        sample_rate=16000,
        tasks=[task, task],
        lengths=torch.tensor([4000, 2500 + 500 * r]),
        targets=[1 + r, 3],
    )


def loss_of(run, b) -> torch.Tensor:
    return run(*b)[0] if isinstance(b, tuple) else run(b).loss


def train(layout: str, rank: int, steps: int = 2, dtype=torch.float64, make=Tiny, data=tiny_batch) -> dict:
    """Two AdamW steps on ``layout``: ``ref`` (one process, the two ranks' batches as micro-batches), ``ddp_ep``, ``fsdp_ep``, ``fsdp_ep_bf16``."""
    torch.manual_seed(0)
    init = make(1).to(dtype).state_dict()
    model = make(1 if layout == "ref" else 2).to(dtype)
    model.load_state_dict(init)
    run = model
    if layout != "ref":
        parallel.shard_experts(model)
        if layout == "ddp_ep":
            parallel.ignore_experts_in_ddp(model)
            run = nn.parallel.DistributedDataParallel(model, find_unused_parameters=make is not Tiny)
        else:
            bf16 = layout.endswith("bf16")
            parallel.apply_fsdp(model, param_dtype="bf16" if bf16 else None, reduce_dtype="fp32" if bf16 else None)
    # fp32 runs: eps above the rounding noise of gradients that are zero by construction (a key bias
    # under softmax), which Adam would otherwise blow up to +-lr in either run
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-8 if dtype == torch.float64 else 1e-6)
    losses, norms, pred_dtype = [], [], None
    for step in range(steps):
        opt.zero_grad()
        if layout == "ref":
            world = dist.get_world_size()
            loss = sum(loss_of(run, data(step, r, dtype)) for r in range(world)) / world
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        else:
            b = data(step, rank, dtype)
            if isinstance(b, tuple):
                pred_dtype = str(run(*b)[1].dtype)
            loss = loss_of(run, b)
            loss.backward()
            parallel.reduce_expert_grads(model)
            norms.append(float(parallel.clip_grad_norm_(model, MAX_NORM)))
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss = loss / dist.get_world_size()
        opt.step()
        losses.append(float(loss))
    return {"model": model, "losses": losses, "norms": norms, "init": init, "pred_dtype": pred_dtype, "opt": opt}


def composed_cases(rank: int) -> dict:
    """The composed preset trained two steps with EP 2 under DDP and under FSDP2, against one process."""
    ref = train("ref", rank, make=composed, data=audio_batch, dtype=torch.float32)
    ref_sd = ref["model"].state_dict()
    res = {}
    for layout in ("ddp_ep", "fsdp_ep"):
        r = train(layout, rank, make=composed, data=audio_batch, dtype=torch.float32)
        full = parallel.full_state_dict(r["model"])
        res[layout] = {
            "loss_diff": max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])),
            "losses": r["losses"],
            "norm_diff": max(abs(a - b) / b for a, b in zip(r["norms"], ref["norms"])),
            "norms": r["norms"],
            "weight_diff": max(maxdiff(v, ref_sd[k]) for k, v in full.items()),
            "keys_match": sorted(full) == sorted(ref_sd),
            "moved": max(maxdiff(v, ref["init"][k]) for k, v in ref_sd.items()),
            "worst": sorted(((maxdiff(v, ref_sd[k]), k) for k, v in full.items()), reverse=True)[:4],
        }
    return res


def outputs(model: nn.Module, seed: int) -> torch.Tensor:
    with torch.no_grad():
        return model(*batch(seed, dtype=next(model.parameters()).dtype))[1].double()


def train_cases(rank: int, out_dir: str) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    res: dict = {}
    ref = train("ref", rank)
    ref_sd = ref["model"].state_dict()
    ref32 = train("ref", rank, dtype=torch.float32)
    for layout in ("ddp_ep", "fsdp_ep", "fsdp_ep_bf16"):
        dtype = torch.float32 if layout.endswith("bf16") else torch.float64
        r = train(layout, rank, dtype=dtype)
        model, base = r["model"], (ref32 if dtype == torch.float32 else ref)
        full = parallel.full_state_dict(model)
        path = os.path.join(out_dir, f"{layout}.safetensors")
        parallel.save_full_safetensors(model, path, metadata={"layout": layout})
        mine = outputs(model, 7 + rank)  # collective: both ranks run their own probe batch
        fresh = Tiny(2).to(dtype)  # the same EP-2 layout rebuilt and loaded from the file
        if layout == "ddp_ep":
            parallel.shard_experts(fresh)
        else:
            parallel.shard_experts(fresh)
            parallel.apply_fsdp(fresh)
        parallel.load_full_safetensors(fresh, path)
        reload_diff = maxdiff(outputs(fresh, 7 + rank), mine)
        # optimizer moments: gathered to one-process tensors, and loaded back at the EP layout
        full_opt = parallel.full_optimizer_state_dict(model, r["opt"])
        ref_opt = base["opt"].state_dict()["state"]
        opt_diff = max(
            maxdiff(v, ref_opt[i][k]) for i, e in full_opt["state"].items() for k, v in e.items() if torch.is_tensor(v)
        )
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        parallel.load_full_optimizer_state_dict(fresh, fresh_opt, full_opt)
        again = parallel.full_optimizer_state_dict(fresh, fresh_opt)["state"]
        opt_roundtrip = max(
            maxdiff(v, again[i][k]) for i, e in full_opt["state"].items() for k, v in e.items() if torch.is_tensor(v)
        )
        one = Tiny(1).to(dtype)  # one process, no EP: plain load_state_dict of the file
        one.load_state_dict(load_file(path), strict=True)
        one_out = outputs(one, 7 + rank)
        with safe_open(path, "pt") as fh:
            keys = list(fh.keys())
            meta = fh.metadata()
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in keys if k.endswith("experts.gate_up_proj")}
        res[layout] = {
            "loss_diff": max(abs(a - b) for a, b in zip(r["losses"], base["losses"])),
            "losses": r["losses"],
            "ref_losses": base["losses"],
            "moved": max(maxdiff(v, base["init"][k]) for k, v in base["model"].state_dict().items()),
            "norms": r["norms"],
            "ref_norms": base["norms"],
            "weight_diff": max(maxdiff(v, base["model"].state_dict()[k]) for k, v in full.items()),
            "keys_match": sorted(full) == sorted(ref_sd),
            "pred_dtype": r["pred_dtype"],
            "master_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "one_process_diff": maxdiff(one_out, mine),
            "one_vs_reload_diff": maxdiff(one_out, outputs(fresh, 7 + rank)),
            "out_mag": float(mine.abs().max()),
            "opt_diff": opt_diff,
            "opt_mag": max(float(v.abs().max()) for e in ref_opt.values() for k, v in e.items() if k == "exp_avg"),
            "opt_roundtrip": opt_roundtrip,
            "opt_entries": len(full_opt["state"]),
            "reload_diff": reload_diff,
            "file_keys": len(keys),
            "unique_keys": len(set(keys)),
            "expert_shapes": shapes,
            "metadata": meta,
            "file_dtypes": sorted({str(v.dtype) for v in load_file(path).values()}),
        }
    return res


class SkipBlock(nn.Module):
    """``tanh(lin(x))`` (+ ``extra`` only when asked: a data-dependent skip, as an unused head or weak encoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.extra = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x, use_extra: bool):
        x = torch.tanh(self.lin(x))
        return x + self.extra(x) if use_extra else x


def replica_cases(rank: int) -> dict:
    """4 ranks = EP 2 x 2 expert replicas: expert gradients also averaged over the replica group."""
    ref = train("ref", rank)
    out = {}
    for layout in ("ddp_ep", "fsdp_ep"):
        r = train(layout, rank)
        full = parallel.full_state_dict(r["model"])
        out[layout] = {
            "loss_diff": max(abs(a - b) for a, b in zip(r["losses"], ref["losses"])),
            "norms": r["norms"],
            "ref_norms": ref["norms"],
            "weight_diff": max(maxdiff(v, ref["model"].state_dict()[k]) for k, v in full.items()),
            "keys_match": sorted(full) == sorted(ref["model"].state_dict()),
            "moved": max(maxdiff(v, ref["init"][k]) for k, v in ref["model"].state_dict().items()),
            "losses": r["losses"],
            "ref_losses": ref["losses"],
        }
    return out


class Skippy(nn.Module):
    """Two FSDP units (blocks) and a root readout; only some ranks use block 1's ``extra``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SkipBlock() for _ in range(2))
        self.out = nn.Linear(D, 1)

    def forward(self, x, use_extra: bool):
        for i, b in enumerate(self.blocks):
            x = b(x, use_extra and i == 1)
        return self.out(x).square().mean()


def fsdp_unused(rank: int) -> dict:
    torch.manual_seed(0)
    ref = Skippy().double()
    model = Skippy().double()
    model.load_state_dict(ref.state_dict())
    parallel.apply_fsdp(model)
    x = [torch.randn(5, D, generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in range(2)]
    (sum(ref(x[r], r == 0) for r in range(2)) / 2).backward()
    model(x[rank], rank == 0).backward()  # rank 1 skips block 1's extra: it must still reduce-scatter
    full = {k: p.grad.full_tensor() for k, p in model.named_parameters()}  # every parameter has one (zeros if unused)
    want = {k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in ref.named_parameters()}
    return {
        "grad_diff": max(maxdiff(g, want[k]) for k, g in full.items()),
        "grad_mag": max(float(g.abs().max()) for g in want.values()),
        "never_used_grad_max": float(full["blocks.0.extra.weight"].abs().max()),
        "params": len(full),
    }


def errors(rank: int) -> dict:
    """Messages for layouts that do not fit: an EP size the world does not divide, a group of the wrong size."""
    out = {}
    layer = audiomoe.component_builder("moe", moe_spec(TOPK, ep=4))(d_model=D)
    try:
        parallel.shard_experts(layer)
    except audiomoe.AudioMoEError as exc:
        out["world"] = str(exc)
    layer = audiomoe.component_builder("moe", moe_spec(TOPK, ep=2))(d_model=D)
    solo = dist.new_group([0])  # every rank creates it; only rank 0 is a member
    if rank == 0:
        try:
            parallel.shard_experts(layer, group=solo)
        except audiomoe.AudioMoEError as exc:
            out["group"] = str(exc)
    return out


def start_gloo(timeout_s: int = 120) -> int:
    """Join the torchrun gloo group with one thread per rank; this rank's index (shared by the gloo test workers)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank()


def finish_rank(out_dir: str, rank: int, res: dict) -> None:
    """Write this rank's results to ``rank<R>.json``, wait for every rank, and leave the group."""
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(res, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="layer,train,composed,fsdp_unused,errors")
    args = ap.parse_args()
    rank = start_gloo()
    res: dict = {}
    only = args.only.split(",")
    if "layer" in only:
        res["layer"] = {name: layer_case(name, cfg, rank) for name, cfg in LAYER_CASES.items()}
    if "train" in only:
        res["train"] = train_cases(rank, args.out)
    if "composed" in only:
        res["composed"] = composed_cases(rank)
    if "replicas" in only:
        res["replicas"] = replica_cases(rank)
    if "fsdp_unused" in only:
        res["fsdp_unused"] = fsdp_unused(rank)
    if "errors" in only:
        res["errors"] = errors(rank)
    finish_rank(args.out, rank, res)


if __name__ == "__main__":
    main()
