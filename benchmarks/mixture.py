"""MoWE mixture cost: sparse weak-encoder execution, and Whisper's ``trim`` window saving.

Part 1 (sparse): a ``mowe_mixture`` with a Whisper base (d 384, 4 layers) and 4 equal weak encoders (HuBERT-shaped: d 384, 4 layers,
random init), fused by ``concat`` whose router slot holds a seeded random top-1 router (balanced
groups: the worst case for the batch split). Forward time (no grad) of, side by side, interleaved, medians:
``base`` (the base encoder alone), ``one_weak`` (one weak encoder on the whole batch),
``all_weak`` (every weak encoder on the whole batch: dense MoWE), and ``mixture`` (the whole
mixture: base + router + the selected weak encoders on their groups + align + adapter).
Target: ``mixture <= base + 1.1 * one_weak``, i.e. ``(mixture - base) / one_weak <= 1.1``.

Part 2 (trim): Whisper-tiny-shaped encoder (d 384, 4 layers, random init) on 5 s clips, window
``pad30`` (1500 positions, the original) vs ``trim`` (250 positions).

``--quick``: batch 8 of 2 s clips (sparse), 3 repetitions; ``--smoke``: every encoder 1 layer of width 64,
0.5 s clips, 1 repetition (the same parts and cases: seconds).

Usage: python benchmarks/mixture.py [--quick | --smoke] [--json FILE] [--reps N] [--threads N]
"""

from __future__ import annotations

import argparse

import torch

from _common import Report, add_mode_flags, builder, measure, mode_of

BENCH = "mixture"
SR = 16000
#: Whisper-tiny-shaped encoders (d 384, 4 layers): the base, the ``trim`` part, and HuBERT-shaped weak encoders
FULL_DIMS = {"width": 384, "layers": 4, "heads": 6}
#: the smoke run's encoders: one layer of width 64 (same classes and code paths, a fraction of the compute)
SMOKE_DIMS = {"width": 64, "layers": 1, "heads": 2}


def whisper_config(dims: dict, **extra) -> dict:
    """A random-init Whisper encoder config of ``dims`` (width, layers, heads; FFN 4x width)."""
    d = dims["width"]
    return {
        "d_model": d,
        "encoder_layers": dims["layers"],
        "encoder_attention_heads": dims["heads"],
        "encoder_ffn_dim": 4 * d,
        **extra,
    }


def hubert_config(dims: dict) -> dict:
    """A random-init HuBERT-shaped weak encoder config of ``dims`` (conv feature extractor of 3 layers of 128 channels)."""
    d = dims["width"]
    return {"hidden_size": d, "num_hidden_layers": dims["layers"], "num_attention_heads": dims["heads"], "intermediate_size": 4 * d,
            "conv_dim": [128, 128, 128]}  # fmt: skip


def build(kind: str, name: str, params: dict, **context) -> torch.nn.Module:
    """Build a registered component as the composer would."""
    return builder(kind, name, **params)(**context)


def sparse_part(batch: int, seconds: float, window_positions: int, reps: int, emit, dims: dict = FULL_DIMS) -> None:
    """Time base / one weak / all weak / the whole mixture (top-1 of 4, random router), forward, side by side."""
    torch.manual_seed(0)
    weak = [{"name": "hubert", "params": {"config": hubert_config(dims)}} for _ in range(4)]
    mix = build(
        "encoder",
        "mowe_mixture",
        {
            "base": {
                "name": "whisper",
                "params": {"config": whisper_config(dims, max_source_positions=window_positions)},
            },
            "weak": weak,
            "fusion": {"name": "concat", "params": {"router": {"name": "random", "params": {"k": 1}}}},
        },
        d_model=256,
        task_names=["a"],
    ).eval()
    t = int(seconds * SR)
    x = torch.randn(batch, t) * 0.1
    lengths = torch.full((batch,), t)
    with torch.no_grad():
        groups = mix(x, lengths).routing["mowe"].counts.tolist()
    cases = {
        "base": lambda: mix.base(x, lengths),
        "one_weak": lambda: mix.weak[0](x, lengths),
        "all_weak": lambda: [w(x, lengths) for w in mix.weak],
        "mixture": lambda: mix(x, lengths),
    }
    with torch.no_grad():
        med = measure(cases, reps)
    case = f"B={batch},{seconds:g}s,top1of4"
    print(f"\n[sparse] {case}; samples per weak encoder in one call: {groups}")
    print(f"{'part':<12}{'ms':>10}")
    for n, v in med.items():
        print(f"{n:<12}{v * 1e3:>10.1f}")
        emit(case, f"{n}_ms", v * 1e3, "ms")
    extra = (med["mixture"] - med["base"]) / med["one_weak"]
    dense = med["base"] + med["all_weak"]
    print(f"(mixture - base) / one_weak = {extra:.2f}x   (target <= 1.1x)")
    print(f"mixture / (base + all_weak)  = {med['mixture'] / dense:.2f}x")
    emit(case, "extra_over_one_weak", extra, "x")
    emit(case, "mixture_over_dense", med["mixture"] / dense, "x")


def trim_part(batch: int, seconds: float, reps: int, emit, dims: dict = FULL_DIMS) -> None:
    """Time a Whisper encoder with the original 30 s window (``pad30``) against ``trim``, same weights, same clips."""
    torch.manual_seed(0)
    cfg = whisper_config(dims)
    pad = build("encoder", "whisper", {"config": cfg}).eval()
    trim = build("encoder", "whisper", {"config": cfg, "window": "trim"}).eval()
    trim.load_state_dict(pad.state_dict())
    t = int(seconds * SR)
    x = torch.randn(batch, t) * 0.1
    with torch.no_grad():
        med = measure({"pad30": lambda: pad(x), "trim": lambda: trim(x)}, reps)
    case = f"whisper-{'tiny' if dims == FULL_DIMS else 'd' + str(dims['width'])}-shape,B={batch},{seconds:g}s"
    print(f"\n[trim] {case}")
    for n, v in med.items():
        print(f"{n:<12}{v * 1e3:>10.1f} ms")
        emit(case, f"{n}_ms", v * 1e3, "ms")
    print(f"pad30 / trim = {med['pad30'] / med['trim']:.2f}x")
    emit(case, "pad30_over_trim", med["pad30"] / med["trim"], "x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mode_flags(ap, "reduced sizes, same code paths (< 1 min)")
    ap.add_argument("--json", help="write JSON lines here")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    mode = mode_of(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report(BENCH, mode)
    emit = report.emit
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu{'' if mode == 'full' else f' ({mode})'}")
    if mode == "smoke":
        reps = args.reps or 1
        sparse_part(batch=4, seconds=0.5, window_positions=25, reps=reps, emit=emit, dims=SMOKE_DIMS)
        trim_part(batch=1, seconds=0.5, reps=reps, emit=emit, dims=SMOKE_DIMS)
    elif mode == "quick":
        reps = args.reps or 3
        sparse_part(batch=8, seconds=2.0, window_positions=100, reps=reps, emit=emit)
        trim_part(batch=2, seconds=5.0, reps=reps, emit=emit)
    else:
        reps = args.reps or 7
        sparse_part(batch=16, seconds=5.0, window_positions=250, reps=reps, emit=emit)
        trim_part(batch=4, seconds=5.0, reps=reps, emit=emit)
    report.write(args.json)


if __name__ == "__main__":
    main()
