"""Training step time: data / forward / backward / optimizer per step, and MoE vs dense at equal active FLOPs.

1. Split: for each tiny preset on the built-in corpus (the real loader: decode, resample, bucket,
   pad) the trainer's step is timed in its four parts (``audiomoe.train.steploop`` does the same
   split in ``log.jsonl``) with 0 and 2 DataLoader workers; the figure is each part's median
   seconds and the data share of the step (target < 10% with workers).
2. MoE vs dense: ``tiny-corpus`` (4 SwiGLU experts of width 64, top-2: 128 active hidden units per
   token) against the same model whose FFN is one dense SwiGLU of width 128 (same active FLOPs,
   one-column top-1 router), and the UniMoE block (top-p over 8 experts of width 32 + 1 null, 2
   gated shared experts of width 64) against a dense FFN as wide as its measured active width
   (mean routed experts per token x 32 + 2 x 64). A full training step (forward, backward, AdamW)
   on one fixed corpus batch, interleaved, median over repetitions (target: MoE <= 1.3x dense).

``--quick``: the first two presets, 6 steps, 5 repetitions; ``--smoke``: every preset and pair on the ``tiny``
corpus (made once into the cache, ~10 s), batch 4, 1 step after 1 warm-up, 1 repetition (seconds).

Usage: python benchmarks/train_step.py [--quick | --smoke] [--json FILE] [--reps N] [--batch-size N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import audiomoe
from audiomoe.train.data import build_data

from _common import Report, add_mode_flags, measure, mode_of, table

BENCH = "train_step"
PRESETS = {
    "tiny-corpus (moe top-2)": ("tiny-corpus", []),
    "tiny-corpus unimoe (top-p)": (
        "tiny-corpus",
        ["backbone=unimoe_transformer", "backbone.moe.expert.d_ff=32", "backbone.moe.shared_d_ff=64"],
    ),
    "mowe-tiny corpus heads": (
        "tiny-corpus",
        [
            "encoder={name: mowe_mixture, params: {base: {name: whisper, params: {config: {d_model: 48, max_source_positions: 250}}}, "
            "weak: [{name: whisper, params: {config: {d_model: 16, max_source_positions: 250}}}, {name: hubert}]}}",
            "adapter={name: stack_mlp, params: {stack: 2, layers: 2}}",
        ],
    ),
}
DENSE = ["backbone.moe.num_experts=1", "backbone.moe.router=top_k", "backbone.moe.router.k=1"]


def split(
    preset: str, sets: list[str], workers: int, steps: int, warmup: int, batch: int, corpus: str = "builtin"
) -> dict[str, float]:
    """Median seconds of data / forward / backward / optimizer / step over ``steps`` training steps on ``corpus``."""
    model = audiomoe.compose(preset, sets)
    data, _ = build_data(model, corpus, None, batch_size=batch, seed=0, eval_batches=0, workers=workers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    parts: dict[str, list[float]] = {k: [] for k in ("data", "forward", "backward", "optimizer", "step")}
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        b = next(data)
        t1 = time.perf_counter()
        out = model(b, predict=False)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        t3 = time.perf_counter()
        opt.step()
        model.advance_schedules()
        t4 = time.perf_counter()
        if i >= warmup:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                parts[k].append(v)
    med = {k: statistics.median(v) for k, v in parts.items()}
    med["data_share"] = sum(parts["data"]) / sum(parts["step"])
    return med


def step_case(model: torch.nn.Module, batch: audiomoe.AudioBatch):
    """A timed case: one full training step of ``model`` on ``batch``."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        model(batch, predict=False).loss.backward()
        opt.step()

    return run


def moe_vs_dense(report: Report, reps: int, batch_size: int, corpus: str = "builtin") -> list[list[str]]:
    """Step-time ratio of each MoE preset to its equal-active-FLOPs dense twin, on one fixed batch of ``corpus``."""
    probe = audiomoe.compose("tiny-corpus")
    data, _ = build_data(probe, corpus, None, batch_size=batch_size, seed=0, eval_batches=0, workers=0)
    batch = next(data)
    uni = PRESETS["tiny-corpus unimoe (top-p)"][1]
    moe_u = audiomoe.compose("tiny-corpus", uni)
    with torch.no_grad():
        routing = moe_u(batch, predict=False).routing
    per_token = statistics.mean(
        r.summary()["columns_per_item"] for k, r in routing.items() if k.startswith("backbone/")
    )
    null_share = statistics.mean(
        float(r.mask[r.item_mask][:, -1].float().mean()) for k, r in routing.items() if k.startswith("backbone/")
    )
    width = max(1, round((per_token - null_share) * 32 + 2 * 64))  # routed picks that compute + the two shared experts
    pairs = {
        "tiny-corpus top-2 vs dense d_ff 128": (
            audiomoe.compose("tiny-corpus"),
            audiomoe.compose("tiny-corpus", DENSE + ["backbone.moe.expert.d_ff=128"]),
        ),
        f"unimoe top-p vs dense d_ff {width}": (
            moe_u,
            audiomoe.compose(
                "tiny-corpus",
                uni
                + DENSE
                + ["backbone.moe.num_null=0", "backbone.moe.num_shared=0", f"backbone.moe.expert.d_ff={width}"],
            ),
        ),
    }
    rows = []
    for name, (moe, dense) in pairs.items():
        t = measure({"moe": step_case(moe, batch), "dense": step_case(dense, batch)}, reps, guard=True)
        ratio = t["moe"] / t["dense"]
        report.emit(name, "moe_step", t["moe"], "s")
        report.emit(name, "dense_step", t["dense"], "s")
        report.emit(name, "moe_over_dense", ratio, "x")
        rows.append([name, f"{t['moe'] * 1e3:.1f} ms", f"{t['dense'] * 1e3:.1f} ms", f"{ratio:.2f}x"])
    return rows


def main() -> None:
    """Run the split and the MoE-vs-dense ratio; print tables, write JSON lines with --json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_mode_flags(ap, "fewer steps and repetitions (under a minute)")
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="items per batch (default 16, smoke 4)")
    args = ap.parse_args()
    mode = mode_of(args)
    steps, warmup = {"full": (30, 5), "quick": (6, 2), "smoke": (1, 1)}[mode]
    reps = args.reps or {"full": 15, "quick": 5, "smoke": 1}[mode]
    args.batch_size = args.batch_size or (4 if mode == "smoke" else 16)
    corpus = "builtin"
    # smoke: the tiny corpus (seconds to make, once), not the built-in small one (minutes on a clean machine)
    if mode == "smoke":
        from audiomoe.data import builtin_corpus

        corpus = str(builtin_corpus(None, "tiny", progress=False))
    report = Report(BENCH, mode)
    rows = []
    presets = dict(list(PRESETS.items())[:2]) if mode == "quick" else PRESETS
    for case, (preset, sets) in presets.items():
        for workers in (0, 2):
            m = split(preset, sets, workers, steps, warmup, args.batch_size, corpus)
            for k in ("data", "forward", "backward", "optimizer", "step"):
                report.emit(f"{case}, {workers} workers", k, m[k], "s")
            report.emit(f"{case}, {workers} workers", "data_share", m["data_share"], "fraction")
            rows.append(
                [case, str(workers)]
                + [f"{m[k] * 1e3:.1f}" for k in ("data", "forward", "backward", "optimizer", "step")]
                + [f"{m['data_share']:.1%}"]
            )
    print(
        f"training step split (batch {args.batch_size}, built-in {'tiny' if mode == 'smoke' else 'small'} corpus, medians in ms over {steps} steps)\n"
    )
    print(table(rows, ["preset", "workers", "data", "forward", "backward", "optimizer", "step", "data share"]))
    print(
        f"\nMoE vs dense with the same active FLOPs (full training step on one batch, median of {reps}, interleaved)\n"
    )
    print(table(moe_vs_dense(report, reps, args.batch_size, corpus), ["case", "MoE", "dense", "ratio"]))
    report.write(args.json)


if __name__ == "__main__":
    main()
