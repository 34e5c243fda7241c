"""KV-cached generation against re-running the sequence every step, on the tiny UniMoE-Audio preset.

The codec head of ``unimoe-audio-tiny`` (a tiny Qwen2 upcycled with UniMoE-Audio's MoE in every
layer: top-p 0.7, 8 routed + 1 null + 2 gated shared experts; 12 codebooks with delays 0, 8..18)
writes 200 codec frames (218 decoder steps with the delays) greedily, conditioned on a text prompt
and a clip of audio. ``cache``: the prefix runs once, then one frame per decoder call;
``no cache``: the whole sequence runs again each frame. Both produce the same codes (checked before
timing); the figure is the ratio no-cache / cache, measured side by side, interleaved, medians (of wall time, and
of the process's CPU time beside it: the steadier of the two on a loaded machine).
The same for the ``text`` head of ``mowe-unimoe-tiny`` (64 tokens). At this size a decoding step is
dominated by per-call overhead (a few dozen small ops per MoE layer with the ``dense`` plan, as many
per attention layer), so the ratio is small for one short clip and grows with batch and conditioning
length, where re-running the sequence costs compute.

The anchor: transformers' own ``generate`` (``use_cache`` True / False) on the *dense* Qwen2 of the
same config (the LM before upcycling), from a prefix of the same length and batch, writing the same
number of tokens: what a KV cache buys at this size with no MoE layer at all.

``--quick``: 40 frames / 16 tokens, 2 repetitions; ``--smoke``: one codec point (4 frames, 0.5 s, batch 1) and
one text point (4 tokens), 1 repetition, with the same equality checks and the HF anchor (seconds).

Usage: python benchmarks/generation.py [--quick | --smoke] [--json FILE] [--reps N] [--threads N] [--only 1x1 10x4 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import audiomoe

from _common import Report, add_mode_flags, measure, mode_of

BENCH = "generation"


def codec_cases(frames: int, seconds: float, batch: int) -> tuple[dict, list, tuple]:
    """Timed cases (cache / no cache) for the codec head, whether both write the same codes, and the HF anchor."""
    # one codec head serves speech and music (UniMoE-Audio's codec space); the tts task's prompt is timed
    over = ["tasks.codec.temperature=0", f"tasks.codec.min_frames={frames}", f"tasks.codec.max_frames={frames}"]
    model = audiomoe.compose("unimoe-audio-tiny", over).eval()
    g = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(batch, int(16000 * seconds), generator=g)
    with torch.no_grad():
        audio, pad, _, _ = model.adapt(wav, None, 16000)
        head = model.heads["tts"]
        task = {"task": "tts"} if head.accepts_task else {}
        prefix = head(audio, pad, prompts=["hello there"] * batch, decoder=model.backbone, **task)
    cached = head.generate(prefix)
    same = [torch.equal(a, b) for a, b in zip(cached, head.generate(prefix, use_cache=False))]
    steps = cached[0].shape[1] + max(head.delays) + 1  # decoder calls: the frames, the delay tail, eos
    anchor = (hf_dense_cases(model, prefix.embeds.shape[1], batch, steps), prefix.embeds.shape[1], steps)
    return (
        {"cache": lambda: head.generate(prefix), "no cache": lambda: head.generate(prefix, use_cache=False)},
        same,
        anchor,
    )


def text_cases(tokens: int, seconds: float, batch: int) -> tuple[dict, list, tuple]:
    """Timed cases for the text head (``tokens`` new tokens, eos never ends early: a random LM)."""
    model = audiomoe.compose("mowe-unimoe-tiny", [f"tasks.asr.max_new_tokens={tokens}"]).eval()
    g = torch.Generator().manual_seed(0)
    wav = 0.1 * torch.randn(batch, int(16000 * seconds), generator=g)
    with torch.no_grad():
        audio, pad, _, _ = model.adapt(wav, None, 16000)
        head = model.heads["asr"]
        inputs = head(audio, pad, decoder=model.backbone)
    same = [a == b for a, b in zip(head.generate(inputs), head.generate(inputs, use_cache=False))]
    n = head.build_inputs(inputs).inputs_embeds.shape[1]
    anchor = (hf_dense_cases(model, n, batch, tokens), n, tokens)
    return (
        {"cache": lambda: head.generate(inputs), "no cache": lambda: head.generate(inputs, use_cache=False)},
        same,
        anchor,
    )


def with_cpu_time(fn: Callable[[], object], store: list) -> Callable[[], None]:
    """``fn`` that also appends the process CPU time it took to ``store`` (the warm-up's included: medians read it)."""

    def run() -> None:
        t0 = time.process_time()
        fn()
        store.append(time.process_time() - t0)

    return run


def hf_dense_cases(model, prefix_len: int, batch: int, steps: int) -> dict:
    """transformers' ``generate`` with and without its cache on the dense LM of ``model``'s backbone config."""
    import transformers

    config = model.backbone.lm.config
    lm = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, prefix_len), generator=torch.Generator().manual_seed(0))
    run = lambda cache: lm.generate(  # noqa: E731
        ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=cache, pad_token_id=0
    )
    return {"cache": lambda: run(True), "no cache": lambda: run(False)}


def main() -> None:
    """Time cached and uncached generation per point and its HF anchor; print the table, write JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mode_flags(ap, "fewer frames and repetitions (same code paths)")
    ap.add_argument("--json", default="", help="also write the figures as JSON lines here")
    ap.add_argument("--reps", type=int, default=0, help="timed repetitions per case (default 5, quick 2, smoke 1)")
    ap.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="SECONDSxBATCH",
        help="run only these codec points (e.g. --only 1x1 10x4: the issue's two must-show points); no text point",
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's; 1 is steadier on a loaded machine)"
    )
    args = ap.parse_args()
    mode = mode_of(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reps = args.reps or {"full": 5, "quick": 2, "smoke": 1}[mode]
    report = Report(BENCH, mode)
    rows = []
    if mode == "smoke":
        points = [("codec", 4, 0.5, 1), ("text", 4, 0.5, 1)]
    else:
        frames = 40 if mode == "quick" else 200
        # the ratio grows with what the no-cache run must redo each step: batch x (prompt + audio + frames so far)
        points = [("codec", frames, 1.0, 1), ("codec", frames, 1.0, 4), ("codec", frames, 10.0, 1), ("codec", frames, 10.0, 4),
                  ("text", 16 if mode == "quick" else 64, 1.0, 4)]  # fmt: skip
    if args.only:
        want = {tuple(float(v) for v in o.lower().split("x")) for o in args.only}
        points = [pt for pt in points if pt[0] == "codec" and (pt[2], float(pt[3])) in want]
        if not points:
            raise SystemExit(f"--only {args.only} names none of this mode's codec points (SECONDSxBATCH, e.g. 1x1)")
    for head, n, seconds, batch in points:
        cases, same, anchor = (codec_cases if head == "codec" else text_cases)(n, seconds, batch)
        if not all(same):
            raise SystemExit(
                f"{head}: generation with and without the KV cache differ ({same}); not timing a wrong result"
            )
        case = f"{head} {n} {'frames' if head == 'codec' else 'tokens'}, {seconds:g} s audio, batch {batch}"
        for name, timed in ((case, cases), (f"  anchor: HF dense, prefix {anchor[1]}, {anchor[2]} tokens", anchor[0])):
            cpu: dict[str, list[float]] = {}
            t = measure({k: with_cpu_time(fn, cpu.setdefault(k, [])) for k, fn in timed.items()}, reps, guard=True)
            ratio = t["no cache"] / t["cache"]
            # the process's CPU time beside the wall time: on a loaded machine the wall time of a step of small ops
            # grows more than its work (waiting for a core), which squeezes the wall ratio
            cpu_ratio = statistics.median(cpu["no cache"]) / statistics.median(cpu["cache"])
            report.emit(name.strip(), "cache_seconds", t["cache"], "s")
            report.emit(name.strip(), "no_cache_seconds", t["no cache"], "s")
            report.emit(name.strip(), "speedup", ratio, "x")
            report.emit(name.strip(), "cpu_time_speedup", cpu_ratio, "x")
            rows.append((name, t["cache"], t["no cache"], ratio, cpu_ratio))
    print(f"{'case':52s} {'cache s':>9s} {'no cache s':>11s} {'speedup':>8s} {'(CPU time)':>10s}")
    for case, a, b, r, rc in rows:
        print(f"{case:52s} {a:9.3f} {b:11.3f} {r:7.2f}x {rc:9.2f}x")
    report.write(args.json)


if __name__ == "__main__":
    main()
