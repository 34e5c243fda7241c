"""Activation checkpointing: memory and time of one fwd+bwd with ``none`` / ``full`` / ``selective``, and the anchor.

Model: a ``moe_transformer`` of 4 blocks, d_model 256, 8 SwiGLU experts of width 512, top-2, 4 heads, on
4 x 1024 = 4096 tokens (float32, CPU). For each mode of ``audiomoe.train.act_ckpt``:
  - ``peak``: the resident-memory high-water mark one fwd+bwd adds, in a fresh process per mode
    (``benchmarks/_act_ckpt_child.py``: gradients preallocated and a warm-up step first, so the
    figure is the activations and scratch of the step); ``held``: what is still added right after
    the forward (kept for backward);
  - ``time``: seconds per fwd+bwd, the three modes interleaved in this process (medians);
  - equality: loss and every parameter gradient against ``none`` (largest absolute difference).
The anchor: transformers' ``MixtralModel`` (installed class) of the same sizes, with and without its own
``activation_checkpointing_enable`` (full per-layer checkpointing): its peak and time ratios side by side.
Ratios: ``peak full/none``, ``peak selective/none``, ``time full/none``, ``time selective/none``, and the
same two for Mixtral. The issue's target: peak full/none at most 0.5.

``--quick``: 4 x 256 tokens, d_model 128, 3 repetitions; ``--smoke``: 2 x 64 tokens, d_model 64, 1 repetition,
the same code paths and checks (seconds).

Usage: python benchmarks/act_ckpt.py [--quick | --smoke] [--json FILE] [--reps N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from _act_ckpt_child import backbone

from audiomoe.train.act_ckpt import MODES, apply_activation_checkpointing

from _common import Report, add_mode_flags, measure, mode_of

BENCH = "act_ckpt"
HERE = Path(__file__).resolve().parent
#: (d_model, tokens per row, rows, layers, repetitions) per run size
SIZES = {"full": (256, 1024, 4, 4, 5), "quick": (128, 256, 4, 4, 3), "smoke": (64, 64, 2, 4, 1)}


def peak_child(mode: str, d: int, n: int, rows: int, layers: int, kind: str = "audiomoe") -> dict:
    """One fwd+bwd of ``kind`` under ``mode`` in a fresh process: its JSON line (peak, held, seconds)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(HERE / "_act_ckpt_child.py"), mode, str(d), str(n), str(rows), str(layers), kind]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def equality(d: int, n: int, rows: int, layers: int) -> dict[str, tuple[float, float]]:
    """``mode -> (|loss - loss_none|, max |grad - grad_none|)`` for one fwd+bwd from the same seed."""
    torch.manual_seed(0)
    base = backbone(d, layers)
    x, pad = torch.randn(rows, n, d), torch.zeros(rows, n, dtype=torch.bool)
    target = torch.randn(rows, n, d)
    res = {}
    for mode in MODES:
        m = copy.deepcopy(base)
        apply_activation_checkpointing(m, mode)
        loss = (m(x, pad).hidden * target).mean()
        loss.backward()
        res[mode] = (loss.detach(), {k: p.grad for k, p in m.named_parameters()})
    loss0, g0 = res["none"]
    return {
        mode: (float((loss - loss0).abs()), max(float((g[k] - g0[k]).abs().max()) for k in g0))
        for mode, (loss, g) in res.items()
    }


def timings(d: int, n: int, rows: int, layers: int, reps: int) -> dict[str, float]:
    """Median seconds of one fwd+bwd per mode, interleaved in this process."""
    torch.manual_seed(0)
    base = backbone(d, layers)
    x, pad = torch.randn(rows, n, d), torch.zeros(rows, n, dtype=torch.bool)
    models = {}
    for mode in MODES:
        models[mode] = copy.deepcopy(base)
        apply_activation_checkpointing(models[mode], mode)

    def case(m: torch.nn.Module):
        return lambda: m(x, pad).hidden.pow(2).mean().backward()

    return measure({mode: case(m) for mode, m in models.items()}, reps, guard=True)


def main() -> None:
    """Run the benchmark and print its table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mode_flags(ap, "4 x 256 tokens, d_model 128, 3 repetitions")
    ap.add_argument("--json", default="", help="write the figures as JSON lines")
    ap.add_argument("--reps", type=int, default=None, help="timing repetitions")
    args = ap.parse_args()
    mode = mode_of(args)
    d, n, rows, layers, reps = SIZES[mode]
    reps = args.reps or reps
    report = Report(BENCH, mode)
    shape = (d, n, rows, layers)
    print(f"activation checkpointing: moe_transformer {layers} blocks, d_model {d}, {rows} x {n} tokens, top-2 of 8")
    eq = equality(*shape)
    for m, (dl, dg) in eq.items():
        assert dl <= 1e-6 and dg <= 1e-6, f"{m}: loss differs by {dl:.2e}, gradients by {dg:.2e}"
        report.emit(m, "max_grad_diff", dg, "abs")
    mem = {m: peak_child(m, *shape) for m in MODES}
    hf = {m: peak_child(m, *shape, kind="mixtral") for m in ("none", "full")}
    secs = timings(*shape, reps)
    print(
        f"{'mode':<12}{'peak MiB':>10}{'held MiB':>10}{'peak/none':>11}{'time ms':>10}{'time/none':>11}{'grad diff':>11}"
    )
    for m in MODES:
        peak, held = mem[m]["peak"] / 2**20, mem[m]["held"] / 2**20
        # smoke sizes are below the resident-memory resolution: no ratio of noise
        ratio = mem[m]["peak"] / mem["none"]["peak"] if mem["none"]["peak"] > 4 * 2**20 else float("nan")
        tratio = secs[m] / secs["none"]
        print(
            f"{m:<12}{peak:>10.1f}{held:>10.1f}{ratio:>10.2f}x{secs[m] * 1e3:>10.1f}{tratio:>10.2f}x{eq[m][1]:>11.1e}"
        )
        report.emit(m, "peak_bytes", mem[m]["peak"], "B")
        report.emit(m, "held_bytes", mem[m]["held"], "B")
        report.emit(m, "seconds", secs[m], "s")
        if m != "none":
            report.emit(f"{m}/none", "peak", ratio, "x")
            report.emit(f"{m}/none", "time", tratio, "x")
    hf_ratio = hf["full"]["peak"] / hf["none"]["peak"] if hf["none"]["peak"] > 4 * 2**20 else float("nan")
    hf_time = hf["full"]["seconds"] / hf["none"]["seconds"]
    print(
        f"anchor transformers MixtralModel: peak none {hf['none']['peak'] / 2**20:.1f} MiB, full "
        f"{hf['full']['peak'] / 2**20:.1f} MiB = {hf_ratio:.2f}x; time full/none {hf_time:.2f}x (one step each)"
    )
    report.emit("hf_mixtral full/none", "peak", hf_ratio, "x")
    report.emit("hf_mixtral full/none", "time", hf_time, "x")
    report.write(args.json)


if __name__ == "__main__":
    main()
