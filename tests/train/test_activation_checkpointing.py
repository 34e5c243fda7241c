"""Activation checkpointing (``audiomoe.train.act_ckpt``): same loss, gradients, aux losses and routing; less memory.

Each model is deep-copied and run with ``none``, ``full`` and ``selective`` from the same seed, in
training mode with dropout, router jitter and padding, so a recompute that routed, dropped or masked
differently from the forward would show in the gradients. Memory is measured as the resident-memory
peak of one fwd+bwd in a fresh process; the distributed case is a real 2-process FSDP2 + EP run.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from audiomoe.core.errors import AudioMoEError
from audiomoe.testing import build_component
from audiomoe.train.act_ckpt import apply_activation_checkpointing, checkpoint_mode, checkpoint_units

ROOT = Path(__file__).resolve().parents[2]
UNIMOE = {
    "router": {"name": "top_p", "params": {"input_jitter": 0.05}},
    "num_experts": 8,
    "num_null": 1,
    "num_shared": 2,
    "shared_mode": "gated",
}


def _padded(d: int, b: int = 2, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, n - 4 :] = True
    return torch.randn(b, n, d), pad


def _score(h: torch.Tensor) -> torch.Tensor:
    """A loss with O(1) gradients (a mean of squares gives ~1e-5 ones, under any absolute tolerance)."""
    g = torch.Generator().manual_seed(5)
    return (h * torch.randn(h.shape, generator=g)).sum()


def _step(model: torch.nn.Module, mode: str, run) -> tuple[torch.Tensor, dict, dict, torch.nn.Module]:
    """A deep copy of ``model`` in ``mode``: (loss, every parameter's gradient, aux losses, the copy)."""
    m = copy.deepcopy(model).train()
    apply_activation_checkpointing(m, mode)
    torch.manual_seed(11)  # dropout and router jitter draw the same numbers in every mode
    loss, aux = run(m)
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {k: v.detach() for k, v in aux.items()}, m


def _assert_same(model: torch.nn.Module, run, min_aux: int) -> dict:
    """none / full / selective agree on loss, aux losses and every gradient (atol 1e-6); returns the copies."""
    loss0, grads0, aux0, m0 = _step(model, "none", run)
    assert len(aux0) >= min_aux and all(float(v) > 0 for v in aux0.values())
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads0.values()), "every parameter learns"
    assert max(float(g.abs().max()) for g in grads0.values()) > 1e-2, "gradients well above the tolerance"
    copies = {"none": m0}
    for mode in ("full", "selective"):
        loss, grads, aux, m = _step(model, mode, run)
        assert checkpoint_mode(m) == mode
        torch.testing.assert_close(loss, loss0, atol=1e-6, rtol=0)
        assert aux.keys() == aux0.keys(), "aux losses neither lost nor counted twice"
        for k in aux0:
            torch.testing.assert_close(aux[k], aux0[k], atol=1e-6, rtol=0)
        assert grads.keys() == grads0.keys()
        for n in grads0:
            torch.testing.assert_close(grads[n], grads0[n], atol=1e-6, rtol=1e-5, msg=f"{mode}: {n}")
        copies[mode] = m
    return copies


def _moe_stack(name: str, moe: dict, d: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    params = {"num_layers": 3, "num_heads": 4, "dropout": 0.1, "moe": {"name": "moe", "params": moe}}
    return build_component("backbone", name, params, {"d_model": d})


@pytest.mark.parametrize(
    "name, moe",
    [
        (
            "moe_transformer",
            {"num_experts": 4, "router": {"name": "top_k", "params": {"k": 2, "balance_weight": 0.01}}},
        ),
        ("unimoe_transformer", UNIMOE),
    ],
)
def test_moe_backbones_match_without_checkpointing(name, moe):
    model = _moe_stack(name, moe)
    x, pad = _padded(32)

    def run(m):
        out = m(x, pad, task_ids=None)
        return _score(out.hidden) + sum(out.aux_losses.values()), out.aux_losses

    copies = _assert_same(model, run, min_aux=3)
    assert checkpoint_units(model) == ["blocks.0", "blocks.1", "blocks.2"]
    for mode in ("full", "selective"):  # what the layers report after backward is the first forward's
        for b0, b in zip(copies["none"].blocks, copies[mode].blocks):
            assert dict(b.moe.last_stats) == dict(b0.moe.last_stats)


def test_causal_lm_with_upcycled_moe_keeps_the_padding_in_the_recompute():
    torch.manual_seed(0)
    moe = {"name": "moe", "params": {**UNIMOE, "expert": {"name": "swiglu", "params": {"d_ff": 32}}}}
    lm = build_component("backbone", "causal_lm", {"moe": moe}, {"d_model": 32})
    x, pad = _padded(32)

    def run(m):
        out = m(x, pad)
        return _score(out.hidden) + sum(out.aux_losses.values()), out.aux_losses

    copies = _assert_same(lm, run, min_aux=2)
    assert len(checkpoint_units(lm)) == 2 and all(".layers." in u for u in checkpoint_units(lm))
    for mode in ("full", "selective"):  # the recompute saw the padding (not None): same tokens counted
        loads0 = [m.moe.last_stats["tokens"] for m in copies["none"]._upcycled]
        assert [m.moe.last_stats["tokens"] for m in copies[mode]._upcycled] == loads0 == [20, 20]
        assert all(m.attention_mask is None for m in copies[mode]._upcycled)


@pytest.mark.parametrize("name", ["whisper", "hubert"])
def test_hf_encoder_layers_match_without_checkpointing(name):
    torch.manual_seed(0)
    enc = build_component("encoder", name, {}, {})
    wave = torch.randn(2, 8000)
    lengths = torch.tensor([8000, 6000])

    def run(m):
        out = m(wave, lengths)
        return _score(out.features), {}

    loss0, grads0, _, _ = _step(enc, "none", run)
    for mode in ("full", "selective"):
        loss, grads, _, m = _step(enc, mode, run)
        torch.testing.assert_close(loss, loss0, atol=1e-6, rtol=0)
        for n in grads0:
            torch.testing.assert_close(grads[n], grads0[n], atol=1e-6, rtol=1e-5, msg=f"{mode}: {n}")
        layers = [mod for u, mod in m.named_modules() if u in checkpoint_units(m)]
        assert len(layers) == 2 and all(layer.gradient_checkpointing for layer in layers)


def test_stateful_random_router_routes_the_same_in_the_recompute():
    # the random scorer counts its calls (seed + call): the recompute must use the forward's count
    model = _moe_stack("moe_transformer", {"num_experts": 4, "router": {"name": "random"}})
    x, pad = _padded(32)

    def run(m):
        return _score(m(x, pad).hidden), {}

    copies = _assert_same_no_aux(model, run)
    counts = [b.moe.router.scorer.calls for b in copies["full"].blocks]
    assert counts == [1, 1, 1], "a recompute is not a call of its own"


def _assert_same_no_aux(model, run):
    loss0, grads0, _, m0 = _step(model, "none", run)
    out = {"none": m0}
    for mode in ("full", "selective"):
        loss, grads, _, out[mode] = _step(model, mode, run)
        torch.testing.assert_close(loss, loss0, atol=1e-6, rtol=0)
        for n in grads0:
            torch.testing.assert_close(grads[n], grads0[n], atol=1e-6, rtol=1e-5, msg=f"{mode}: {n}")
    return out


def test_apply_is_reversible_and_keeps_names_copies_and_eval():
    model = _moe_stack("unimoe_transformer", UNIMOE).eval()
    keys = list(model.state_dict())
    x, pad = _padded(32)
    with torch.no_grad():
        ref = model(x, pad).hidden
    assert apply_activation_checkpointing(model, "full") == ["blocks.0", "blocks.1", "blocks.2"]
    assert list(model.state_dict()) == keys and type(model.blocks[0]).__name__ == "CheckpointedMoEBlock"
    twin = copy.deepcopy(model)  # a copy runs its own weights (no bound method of the original)
    with torch.no_grad():
        twin.blocks[0].attn.out.weight.mul_(2.0)
        assert torch.equal(model(x, pad).hidden, ref)  # eval: blocks run as they are
        assert not torch.equal(twin(x, pad).hidden, ref)
    apply_activation_checkpointing(model, "selective")
    assert checkpoint_mode(model) == "selective"
    assert apply_activation_checkpointing(model, "none") == [] and checkpoint_mode(model) == "none"
    assert type(model.blocks[0]).__name__ == "MoEBlock"
    with pytest.raises(AudioMoEError, match="none, full, selective"):
        apply_activation_checkpointing(model, "some")


def test_recipe_field_and_set_override():
    from audiomoe.core.errors import ConfigError
    from audiomoe.train.recipe import recipe_for_preset

    assert recipe_for_preset("tiny-moe-cls", steps=1).activation_checkpointing == "none"
    assert (
        recipe_for_preset("tiny-moe-cls", ["activation_checkpointing=full"], steps=1).activation_checkpointing == "full"
    )
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        recipe_for_preset("tiny-moe-cls", ["activation_checkpointing=everything"], steps=1)


def _peak(mode: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    script = ROOT / "benchmarks" / "_act_ckpt_child.py"  # the benchmark's own measurement
    res = subprocess.run(
        [sys.executable, str(script), mode, "128", "512", "4", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read the memory peak")
def test_full_checkpointing_at_most_half_the_activation_memory():
    none, full = _peak("none"), _peak("full")
    print(f"peak none {none['peak'] / 2**20:.1f} MiB, full {full['peak'] / 2**20:.1f} MiB")
    assert none["peak"] > 16 * 2**20, none  # the activations are large enough to measure
    assert full["peak"] < 0.5 * none["peak"], (none, full)
    assert full["held"] < 0.3 * none["held"], (none, full)


def test_two_gloo_processes_with_fsdp_and_expert_parallel_match_one_process(tmp_path):
    from test_train_distributed import ENV, RECIPE

    from audiomoe.train.distributed import free_port  # noqa: F401 - imported to fail early without torch.distributed
    from audiomoe.train.recipe import load_recipe
    from audiomoe.train.trainer import RunOptions, run_recipe

    recipe = {k: v for k, v in RECIPE.items() if k not in ("log", "distributed")}  # the EP test's model and data
    recipe.update(
        name="ac-tiny",
        eval={"every": 100, "batches": 0},
        checkpoint={"every": 3, "keep": 0},
        stages=[{"name": "a", "steps": 3}],
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_recipe(load_recipe(str(path), []), RunOptions(out_dir=str(tmp_path / "one"), progress=False, device="cpu"))
    env = ENV
    sets = ["activation_checkpointing=full", "distributed.fsdp=true", "distributed.expert_parallel=2"]
    cmd = [sys.executable, "-m", "audiomoe", "train", str(path), "--nproc", "2", "--out", str(tmp_path / "two")]
    cmd += [a for s in sets for a in ("--set", s)] + ["--device", "cpu", "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500, cwd=str(ROOT))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]

    def losses(out: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]

    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3 and a[0] != a[-1]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    info = json.loads((tmp_path / "two" / "run.json").read_text()) if (tmp_path / "two" / "run.json").exists() else {}
    assert info.get("recipe", {}).get("activation_checkpointing", "full") == "full"
