"""Child process of the activation-checkpointing memory test and benchmark: one fwd+bwd, its resident-memory peak.

``python benchmarks/_act_ckpt_child.py MODE D TOKENS_PER_ROW ROWS LAYERS [KIND]`` prints one JSON line:
``peak`` (bytes the fwd+bwd added to the process's resident high-water mark), ``held`` (bytes still
added right after the forward: what is kept for backward) and ``seconds``. A warm-up step runs first and
the gradients stay allocated, so one-time buffers and the gradients count in neither mode; the
high-water mark is then reset (``/proc/self/clear_refs``). Run it with ``MALLOC_MMAP_THRESHOLD_`` set, so
freed activations go back to the system and the resident size follows what is live.
``KIND``: ``audiomoe`` (default; :func:`backbone`) or ``mixtral`` (transformers' ``MixtralModel`` of the same
sizes, checkpointed by its own ``activation_checkpointing_enable``: the anchor; modes none / full).
Used by ``benchmarks/act_ckpt.py`` and ``tests/train/test_activation_checkpointing.py``.
"""

from __future__ import annotations

import json
import sys
import time
from types import SimpleNamespace

import torch


def status(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) * 1024


def backbone(d: int, layers: int) -> torch.nn.Module:
    """The measured model: a ``moe_transformer`` of ``layers`` blocks, 8 SwiGLU experts of width 2d, top-2."""
    from audiomoe.testing import build_component

    moe = {
        "num_experts": 8,
        "router": {"name": "top_k", "params": {"k": 2}},
        "expert": {"name": "swiglu", "params": {"d_ff": 2 * d}},
    }
    params = {"num_layers": layers, "num_heads": 4, "moe": {"name": "moe", "params": moe}}
    return build_component("backbone", "moe_transformer", params, {"d_model": d}).train()


def mixtral(d: int, layers: int) -> torch.nn.Module:
    """transformers' ``MixtralModel`` with :func:`backbone`'s sizes (the installed class, random weights)."""
    from transformers import MixtralConfig, MixtralModel

    cfg = MixtralConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=16)  # fmt: skip
    return MixtralModel(cfg).train()


def main(mode: str, d: int, n: int, rows: int, layers: int, kind: str = "audiomoe") -> dict:
    """Measure one fwd+bwd of :func:`backbone` (or :func:`mixtral`) under ``mode`` (see the module docstring)."""
    from audiomoe.train.act_ckpt import apply_activation_checkpointing

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, pad = torch.randn(rows, n, d), torch.zeros(rows, n, dtype=torch.bool)
    if kind == "mixtral":
        hf = mixtral(d, layers)
        if mode != "none":
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

        def model(x: torch.Tensor, pad: torch.Tensor) -> SimpleNamespace:  # the backbone's call shape
            return SimpleNamespace(hidden=hf(inputs_embeds=x, use_cache=False).last_hidden_state)

        params = hf.parameters()
    else:
        net = backbone(d, layers)
        apply_activation_checkpointing(net, mode)
        model, params = net, net.parameters()
    for p in params:
        p.grad = torch.zeros_like(p)
    model(x, pad).hidden.pow(2).mean().backward()  # warm-up: scratch buffers, lazy state
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the high-water mark to the current resident size
    before = status("VmRSS")
    t0 = time.perf_counter()
    out = model(x, pad)
    held = status("VmRSS") - before
    out.hidden.pow(2).mean().backward()
    seconds = time.perf_counter() - t0
    return {"mode": mode, "kind": kind, "peak": status("VmHWM") - before, "held": held, "seconds": seconds}


if __name__ == "__main__":
    m, *sizes = sys.argv[1:]
    kind = sizes.pop() if len(sizes) == 5 else "audiomoe"
    print(json.dumps(main(m, *map(int, sizes), kind)))
