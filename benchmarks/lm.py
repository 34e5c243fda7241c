"""audiomoe's MoE language model against transformers' own MoE models (issue 28's table), side by side.

One decoder-only MoE LM (``benchmarks/_lm_models.py``) in several implementations with the same weights:
``audiomoe`` (transformers' ``Qwen2ForCausalLM`` with every MLP an audiomoe ``MoELayer``, upcycled, then
distinct random experts), the installed ``MixtralForCausalLM`` and ``Qwen2MoeForCausalLM`` (shared
expert off, ``norm_topk_prob``) under each ``experts_implementation`` transformers offers on CPU
(``eager``, ``batched_mm``, ``grouped_mm``), and the dense limit (``Qwen2ForCausalLM`` with one MLP of
the active width ``k x expert width``). Top-2, Mixtral's renormalised softmax weights, no balance loss on
either side, float32. Before anything is timed, every MoE model's output is checked against audiomoe's
(max abs difference printed; above 1e-4 the run stops); the dense model is a cost reference only.

Cases (full run; hidden 512, 4 layers, 8 heads / 2 KV heads, vocabulary 4096):
  1. training step (forward, backward, AdamW step) on 4 x 1024 tokens at 8 experts x 512 and 32 x 128
     (loss and every gradient checked equal first);
  2. greedy decoding (``generate(do_sample=False)``, prompt 256, 128 new tokens, batch 1 and 4) at hidden
     256, 4 layers, 8 experts x 512, each call from a copy of the prompt's KV cache (all but its last token,
     built once, untimed): ms per token ``(t(128 new) - t(1 new)) / 127``, generated ids checked equal;
     ``audiomoe+gen`` is audiomoe's model inside ``audiomoe.core.decoding.generation_mode()`` (what
     audiomoe's own heads enter);
  3. prefill: one forward of the 256-token prompt with a KV cache, batch 1 and 4 (the decoding model);
  4. one MoE layer call (no grad) at 1 token (decoding model) and at 1 and 4096 tokens (8 x 512 at hidden
     512): audiomoe's ``MoELayer`` vs ``MixtralSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock``.
Timing: ``_common.measure`` (cases interleaved round-robin, one warm-up round, medians). Torch threads: 2
(``--threads``); a shared machine makes the figures noisy (``--guard`` drops disturbed repetitions).
``transformers' best`` is the fastest transformers MoE model of each row.

``--quick``: training on 2 x 512 tokens, 32 new tokens, fewer repetitions (decode + layer alone about five minutes on 2 cores);
``--smoke``: tiny sizes, one repetition, the same code paths and equality checks (seconds; CI).
``--profile``: torch.profiler's top ops of audiomoe's 1-token MoE layer call, and the aten ops of one cached
decoding step per model (batch 1 and 4; a count, steady under other load where wall times are not).

Usage: python benchmarks/lm.py [--quick | --smoke] [--json FILE] [--reps N] [--threads N] [--guard] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from typing import Callable

import torch

from audiomoe.core.decoding import generation_mode
from audiomoe.core.errors import AudioMoEError

from _common import Report, add_mode_flags, measure, mode_of, table
from _lm_models import CPU_IMPLS, LMShape, build_lms, hf_name, impls_for, moe_blocks

BENCH = "lm"
TOL = 1e-4
#: per run size: training shapes and (batch, seq); decoding shape, prompt, new tokens, batches; layer points; reps
SIZES = {
    "full": dict(
        train=(LMShape(512, 4, 8, 2, 8, 512), LMShape(512, 4, 8, 2, 32, 128)), bt=(4, 1024),
        decode=LMShape(256, 4, 8, 2, 8, 512), prompt=256, new=128, batches=(1, 4),
        layer=LMShape(512, 1, 8, 2, 8, 512), tokens=(1, 4096), reps=dict(train=5, decode=5, prefill=10, layer=30),
    ),
    "quick": dict(
        train=(LMShape(512, 4, 8, 2, 8, 512), LMShape(512, 4, 8, 2, 32, 128)), bt=(2, 512),
        decode=LMShape(256, 4, 8, 2, 8, 512), prompt=256, new=32, batches=(1, 4),
        layer=LMShape(512, 1, 8, 2, 8, 512), tokens=(1, 4096), reps=dict(train=3, decode=3, prefill=5, layer=10),
    ),
    "smoke": dict(
        train=(LMShape(64, 2, 4, 2, 8, 64, vocab=256), LMShape(64, 2, 4, 2, 16, 32, vocab=256)), bt=(2, 32),
        decode=LMShape(64, 2, 4, 2, 8, 64, vocab=256), prompt=16, new=4, batches=(1, 4),
        layer=LMShape(32, 1, 4, 2, 8, 64, vocab=256), tokens=(1, 64), reps=dict(train=1, decode=1, prefill=1, layer=1),
    ),
}  # fmt: skip


def _check(case: str, diffs: dict[str, float]) -> None:
    """Print each model's max abs difference to audiomoe and stop the run if one is above :data:`TOL`."""
    print(f"  {case}: max |diff| vs audiomoe " + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()))
    bad = {n: d for n, d in diffs.items() if not d <= TOL}
    if bad:
        raise AudioMoEError(
            f"{case}: outputs differ from audiomoe's by more than {TOL} ({bad}); not timing unequal models"
        )


def _is_moe(name: str) -> bool:
    return name != "dense"


def train_point(s: LMShape, bt: tuple[int, int], reps: int, guard: bool) -> dict[str, float]:
    """Median seconds of one training step (fwd + bwd + AdamW) per model, after checking loss and gradients."""
    models = build_lms(s, impls=_impls(s, bt[0] * bt[1], grad=True))
    ids = torch.randint(0, s.vocab, bt, generator=torch.Generator().manual_seed(1))
    grads, losses = {}, {}
    for name, m in models.items():
        m.train()
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        losses[name] = out.loss.detach()
        grads[name] = {hf_name(n): p.grad for n, p in m.named_parameters()}  # hf_name: identity on transformers' names
        m.zero_grad(set_to_none=True)
    ref = grads["audiomoe"]
    diffs = {}
    for name in models:
        if name in ("audiomoe", "dense"):
            continue
        g = grads[name]
        # Mixtral has no q/k/v biases (audiomoe's are zero): every other gradient is compared
        gd = max((g[k] - v).abs().max().item() for k, v in ref.items() if v is not None and k in g)
        diffs[name] = max(gd, (losses[name] - losses["audiomoe"]).abs().item())
    _check(f"training {s.label()} loss and gradients", diffs)

    def step(m: torch.nn.Module):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5)

        def run() -> None:
            opt.zero_grad(set_to_none=True)
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()

        return run

    return measure({n: step(m) for n, m in models.items()}, reps, guard=guard)


def _prefix_cache(m: torch.nn.Module, ids: torch.Tensor):
    """The KV cache of ``ids`` but its last token (``generate`` then runs that token and the new ones only)."""
    with torch.no_grad():
        return m(input_ids=ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]), use_cache=True).cache


def _generate(m: torch.nn.Module, ids: torch.Tensor, new: int, gen_mode: bool = False, past=None):
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, use_cache=True)
    if past is not None:  # generate extends the cache in place: each call its own copy (the same cost for every model)
        kwargs["cache"] = copy.deepcopy(past)
    if gen_mode:
        with generation_mode():
            return m.generate(ids, **kwargs)
    return m.generate(ids, **kwargs)


def _impls(s: LMShape, tokens: int, grad: bool) -> tuple[str, ...]:
    """The experts implementations to run at this size (``batched_mm`` left out where it would need gigabytes)."""
    impls = impls_for(s, tokens, grad)
    if impls != CPU_IMPLS:
        print(
            f"  {s.label()}, {tokens} tokens{' with grad' if grad else ''}: batched_mm left out (per-pair weight copies > 4 GiB)"
        )
    return impls


def _gen_case(m: torch.nn.Module, ids: torch.Tensor, new: int, gen_mode: bool, past) -> Callable[[], None]:
    return lambda: _generate(m, ids, new, gen_mode, past)


def _prefill_case(m: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)

    return run


def _layer_case(blk: torch.nn.Module, x: torch.Tensor, gen: bool = False) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), generation_mode() if gen else contextlib.nullcontext():
            blk(x)

    return run


def decode_and_prefill(sz: dict, mode: str, guard: bool) -> dict[str, dict[str, float]]:
    """Per batch size: decoding seconds per token and prefill seconds per model (outputs and ids checked first)."""
    s, prompt, new = sz["decode"], sz["prompt"], sz["new"]
    models = build_lms(s, impls=_impls(s, max(sz["batches"]) * prompt, grad=False))  # the prefill is the largest call
    out: dict[str, dict[str, float]] = {}
    for b in sz["batches"]:
        ids = torch.randint(1, s.vocab, (b, prompt), generator=torch.Generator().manual_seed(2 + b))
        with torch.no_grad():
            logits = {n: m(input_ids=ids).logits for n, m in models.items()}
        _check(f"prefill batch {b} logits", {n: (v - logits["audiomoe"]).abs().max().item()
                                              for n, v in logits.items() if _is_moe(n) and n != "audiomoe"})  # fmt: skip
        gen = {n: _generate(m, ids, new) for n, m in models.items()}
        gen["audiomoe+gen"] = _generate(models["audiomoe"], ids, new, gen_mode=True)
        ref = gen["audiomoe"][:, prompt:]
        same = {}
        for n, g in gen.items():
            if not _is_moe(n) or n == "audiomoe":
                continue
            g = g[:, prompt:]
            equal = g.shape == ref.shape and bool((g == ref).all())
            same[n] = equal
            if not equal:
                agree = (g == ref).long().cumprod(1).sum(1).tolist()
                raise AudioMoEError(f"decoding batch {b}: {n}'s greedy ids leave audiomoe's after {agree} tokens")
        print(f"  decoding batch {b}: {ref.shape[1]} new tokens, ids equal in all {len(same)} MoE models")
        # timed from a cache of the prompt: a prefill inside the timed call would put its noise (batched_mm's takes
        # seconds) into the per-token difference
        cases, past = {}, {n: _prefix_cache(m, ids) for n, m in models.items()}
        for n, m in [*models.items(), ("audiomoe+gen", models["audiomoe"])]:
            p = past["audiomoe" if n == "audiomoe+gen" else n]
            cases[(n, "n")] = _gen_case(m, ids, new, n == "audiomoe+gen", p)
            cases[(n, "1")] = _gen_case(m, ids, 1, n == "audiomoe+gen", p)
        with torch.no_grad():
            t = measure(cases, sz["reps"]["decode"], guard=guard)
        names = list(models) + ["audiomoe+gen"]
        out[f"decode per token, batch {b}"] = {n: (t[(n, "n")] - t[(n, "1")]) / (new - 1) for n in names}
        out[f"prefill {prompt} tokens, batch {b}"] = measure(
            {n: _prefill_case(m, ids) for n, m in models.items()}, sz["reps"]["prefill"], guard=guard
        )
    return out


def layer_points(sz: dict, guard: bool) -> dict[str, dict[str, float]]:
    """One MoE layer call (no grad) per implementation: 1 token at the decoding shape, each of ``tokens`` at ``layer``."""
    out = {}
    points = [(sz["decode"], 1)] + [(sz["layer"], t) for t in sz["tokens"]]
    built = {}
    for s, t in points:
        if (s, t) not in built:
            built[(s, t)] = moe_blocks(build_lms(s, impls=_impls(s, t, grad=False)))
        blocks = built[(s, t)]
        x = torch.randn(1, t, s.d, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            ys = {n: (blk(x)[0] if n == "audiomoe" else blk(x)) for n, blk in blocks.items()}
        case = f"MoE layer call, {t} token{'s' if t > 1 else ''}, d{s.d} {s.experts}x{s.width}"
        _check(case, {n: (y - ys["audiomoe"]).abs().max().item() for n, y in ys.items() if n != "audiomoe"})
        cases = {n: _layer_case(blk, x) for n, blk in blocks.items()}
        cases["audiomoe+gen"] = _layer_case(blocks["audiomoe"], x, gen=True)
        out[case] = measure(cases, sz["reps"]["layer"], guard=guard)
    return out


def profile_layer(s: LMShape, calls: int = 50, rows: int = 15) -> str:
    """torch.profiler's table of the top ops (self CPU time) over ``calls`` 1-token calls of audiomoe's MoE layer."""
    from torch.profiler import ProfilerActivity, profile

    layer = moe_blocks(build_lms(s), 0)["audiomoe"]
    x = torch.randn(1, 1, s.d)
    with torch.no_grad():
        for _ in range(5):
            layer(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                layer(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _cached_step(m: torch.nn.Module, nxt, cache, mask, pos) -> Callable[[], None]:
    def run() -> None:
        m(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True, position_ids=pos)
        cache.crop(-1)  # back to the prefix: every profiled step is the same step

    return run


def step_ops(s: LMShape, batch: int, prompt: int = 64, steps: int = 5) -> dict[str, float]:
    """aten ops per cached greedy decoding step (one token per row after a ``prompt``-token prefill), per model.

    The op count of a step is what a decoding step at these sizes costs (each op a few microseconds of
    dispatch on CPU, a launch on GPU), and unlike wall time it does not move with other load on the machine.
    """
    from torch.profiler import ProfilerActivity, profile

    out = {}
    ids = torch.randint(1, s.vocab, (batch, prompt), generator=torch.Generator().manual_seed(5))
    mask, pos = torch.ones(batch, prompt + 1, dtype=torch.long), torch.full((batch, 1), prompt)
    for name, m in build_lms(s, impls=("eager", "batched_mm", "grouped_mm")).items():
        with torch.no_grad():
            first = m(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            cache, nxt = first.cache, first.logits[:, -1:].argmax(-1)

            step = _cached_step(m, nxt, cache, mask, pos)
            step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    step()
        out[name] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / steps
    return out


def _best(times: dict[str, float]) -> tuple[str, float]:
    hf = {n: v for n, v in times.items() if "/" in n}
    name = min(hf, key=hf.get)
    return name, hf[name]


def rows_of(case: str, times: dict[str, float], report: Report) -> list[str]:
    """One summary row (and its JSON lines): audiomoe, transformers' best, the dense limit and the ratios."""
    best, tb = _best(times)
    am, dense = times["audiomoe"], times.get("dense")
    for n, v in times.items():
        report.emit(case, n, v, "s")
    report.emit(case, "audiomoe_over_hf_best", am / tb, "x")
    row = [case, f"{am * 1e3:.2f}", f"{tb * 1e3:.2f} ({best})", f"{am / tb:.2f}x"]
    if "audiomoe+gen" in times:
        report.emit(case, "audiomoe_gen_over_hf_best", times["audiomoe+gen"] / tb, "x")
        row.append(f"{times['audiomoe+gen'] / tb:.2f}x")
    else:
        row.append("-")
    if dense is not None:
        report.emit(case, "audiomoe_over_dense", am / dense, "x")
        report.emit(case, "hf_best_over_dense", tb / dense, "x")
        row += [f"{am / dense:.2f}x", f"{tb / dense:.2f}x"]
    else:
        row += ["-", "-"]
    return row


def main() -> None:
    """Run the four cases, print every model's time per case and the ratio table; JSON lines with --json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_mode_flags(ap, "smaller training batch, 32 new tokens, fewer repetitions (decode + layer alone ~5 min)")
    ap.add_argument("--json", default=None, metavar="FILE")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of every case (default per case and mode)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads outside smoke runs (default 2)")
    ap.add_argument("--guard", action="store_true", help="drop repetitions disturbed by other processes")
    ap.add_argument("--profile", action="store_true", help="print the top ops of audiomoe's 1-token layer call")
    ap.add_argument("--only", default="train,decode,layer", help="comma-separated subset of train,decode,layer")
    args = ap.parse_args()
    mode = mode_of(args)
    if mode != "smoke":
        torch.set_num_threads(args.threads)
    sz = dict(SIZES[mode])
    if args.reps:
        sz["reps"] = {k: args.reps for k in sz["reps"]}
    only = set(args.only.split(","))
    report = Report(BENCH, mode)
    results: dict[str, dict[str, float]] = {}
    print(f"lm benchmark ({mode}, {torch.get_num_threads()} threads, float32, medians; checks:)")
    if "train" in only:
        for s in sz["train"]:
            b, t = sz["bt"]
            results[f"training step, {s.label()}, {b}x{t} tokens"] = train_point(
                s, sz["bt"], sz["reps"]["train"], args.guard
            )
    if "decode" in only:
        results.update(decode_and_prefill(sz, mode, args.guard))
    if "layer" in only:
        results.update(layer_points(sz, args.guard))
    print("\nseconds per case and model (ms)")
    names = sorted({n for t in results.values() for n in t}, key=lambda n: (n != "audiomoe", n != "audiomoe+gen", n))
    print(table([[c] + [f"{t[n] * 1e3:.2f}" if n in t else "-" for n in names] for c, t in results.items()],
                 ["case"] + names))  # fmt: skip
    rows = [rows_of(c, t, report) for c, t in results.items()]
    print("\naudiomoe against transformers' best MoE model and the dense limit (ms; ratios of medians)")
    hdr = ["case", "audiomoe", "transformers' best", "am/HF best", "am+gen/HF best", "am/dense", "HF best/dense"]
    print(table(rows, hdr))
    if args.profile:
        print("\naudiomoe MoE layer, 1-token calls (decoding shape): top ops by self CPU time")
        print(profile_layer(sz["decode"]))
        for b in sz["batches"]:
            ops = step_ops(sz["decode"], b)
            for n, v in ops.items():
                report.emit(f"aten ops per decoding step, batch {b}", n, v, "ops")
            print(f"aten ops per cached decoding step, batch {b}: " + ", ".join(f"{n} {v:.0f}" for n, v in ops.items()))
    report.write(args.json)


if __name__ == "__main__":
    main()
