"""Expert parallelism (EP) and FSDP2 against one process, on real gloo process groups (2 ranks, 127.0.0.1).

One ``torchrun --nproc_per_node 2`` of ``tests/helpers/expert_parallel_worker.py`` (about 10 s here) runs every
distributed scenario; each rank compares itself with one-process references built from the same
full weights and reports differences and magnitudes, which the tests below judge. Layouts follow
UniMoE-Audio (EP 4 on DeepSpeed-MoE) and torchtitan (FSDP2 + EP on torch.distributed).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import audiomoe
from audiomoe.core.errors import AudioMoEError
from audiomoe.train import fsdp as parallel

WORKER = Path(__file__).resolve().parents[1] / "helpers" / "expert_parallel_worker.py"
sys.path.insert(0, str(WORKER.parent))
from helpers import expert_parallel_worker as W  # noqa: E402  (the scenario definitions, shared with the worker)

RANKS = (0, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, nproc: int, only: str = "") -> list[dict]:
    """Run the worker under ``torchrun --nproc_per_node nproc`` on 127.0.0.1; each rank's results."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on the loopback device
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(WORKER),
        "--out",
        str(out),
        *(["--only", only] if only else []),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=WORKER.parents[1])
    if proc.returncode:
        pytest.fail(f"torchrun worker failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """``(results per rank, output dir)`` of one 2-rank torchrun of the worker (every scenario but ``replicas``)."""
    out = tmp_path_factory.mktemp("ep")
    return _torchrun(out, 2), out


@pytest.mark.parametrize("case", list(W.LAYER_CASES))
def test_ep_layer_equals_one_process_layer_in_outputs_and_gradients(dist_run, case):
    """Outputs, input grads and every parameter's grad (sharded experts vs the matching slices) at float64."""
    cfg = W.LAYER_CASES[case]
    for rank in RANKS:
        r = dist_run[0][rank]["layer"][case]
        empty = case == "rank1_all_padding" and rank == 1
        assert r["out_diff"] < 1e-12 and r["xgrad_diff"] < 1e-12, (rank, r)
        assert r["grad_diff"] < 1e-12 and r["grad_mag"] > 0.1, (
            rank,
            r,
        )  # every rank's grads were compared, and were not ~0
        assert empty or (r["out_mag"] > 0.05 and r["xgrad_mag"] > 0.05), (rank, r)
        assert r["expert_params"] >= 2 and r["local_experts"] == W.E // 2
        # null columns stay local: exactly the routed pairs travel (and null picks happened)
        assert r["sent_rows"] == r["routed_pairs"], (rank, r)
        if cfg.get("num_null") and not empty:
            assert r["null_picks"] > 0
        assert r["padded_out_max"] == 0.0
        assert r["full_sd_diff"] == 0.0 and r["full_sd_keys_match"], "gathered state dict = the one-process layer's"
        if cfg.get("capacity_factor"):
            assert r["dropped_pairs"] > 0, "capacity must act locally, as in one process"


def test_a_rank_with_only_padding_still_joins_the_exchange(dist_run):
    r0, r1 = (dist_run[0][rank]["layer"]["rank1_all_padding"] for rank in RANKS)
    assert r1["valid_tokens"] == 0 and r1["sent_rows"] == 0 and r1["out_mag"] == 0.0
    assert r0["sent_rows"] > 0 and r0["out_diff"] < 1e-12  # rank 0's experts still ran rank 0's tokens on rank 1


def _check_training(r: dict, weight_tol: float) -> None:
    assert r["loss_diff"] < weight_tol, r
    assert r["weight_diff"] < weight_tol and r["moved"] > 1e-3, r  # the weights moved, and moved the same way
    assert r["keys_match"]
    assert all(n > W.MAX_NORM for n in r["norms"]), "clipping must act, so a wrong gradient scale shows"
    assert max(abs(a - b) / b for a, b in zip(r["norms"], r["ref_norms"])) < 1e-6, r


@pytest.mark.parametrize("layout", ["ddp_ep", "fsdp_ep"])
def test_two_adamw_steps_with_ep2_match_one_process(dist_run, layout):
    """UniMoE backbone (top-p, null + gated shared experts, padding), EP 2 x DP 2 ranks vs one process, float64."""
    for rank in RANKS:
        _check_training(dist_run[0][rank]["train"][layout], 1e-9)


@pytest.mark.parametrize("layout", ["ddp_ep", "fsdp_ep"])
def test_composed_preset_with_ep2_trains_like_one_process(dist_run, layout):
    """``tiny-unimoe --set backbone.moe.expert_parallel=2``: each rank feeds one head only (float32; 1e-5)."""
    for rank in RANKS:
        r = dist_run[0][rank]["composed"][layout]
        assert r["loss_diff"] < 1e-5 and r["weight_diff"] < 1e-5 and r["moved"] > 1e-3 and r["keys_match"], r
        assert r["norm_diff"] < 1e-5 and all(n > W.MAX_NORM for n in r["norms"])


@pytest.mark.slow
def test_four_ranks_ep2_with_expert_replicas_match_one_process(tmp_path):
    """EP 2 x 2 replicas (4 processes, about 15 s on 2 cores): expert grads also averaged over the replica group."""
    for r in _torchrun(tmp_path, 4, "replicas"):
        for layout in ("ddp_ep", "fsdp_ep"):
            res = r["replicas"][layout]
            assert (
                res["loss_diff"] < 1e-9 and res["weight_diff"] < 1e-9 and res["moved"] > 1e-3 and res["keys_match"]
            ), res
            assert max(abs(a - b) / b for a, b in zip(res["norms"], res["ref_norms"])) < 1e-6


def _safetensors_header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])  # safetensors: an 8-byte length, a JSON header, raw bytes; no pickle


@pytest.mark.parametrize("layout", ["ddp_ep", "fsdp_ep"])
def test_checkpoint_saved_sharded_loads_in_one_process_and_at_ep2(dist_run, layout):
    results, out = dist_run
    head = _safetensors_header(out / f"{layout}.safetensors")
    assert head["__metadata__"]["format"] == "audiomoe-full"
    for rank in RANKS:
        r = results[rank]["train"][layout]
        assert r["one_process_diff"] < 1e-12 and r["out_mag"] > 0.1, r  # one process, no EP, plain load_state_dict
        assert r["reload_diff"] < 1e-12, r  # re-sharded into a fresh EP-2 (and FSDP) layout
        assert r["file_keys"] == r["unique_keys"] and r["file_keys"] + 1 == len(head)  # each expert once
        assert len(r["expert_shapes"]) == 2 and all(s == [W.E, 16, W.D] for s in r["expert_shapes"].values()), (
            "full stacked experts, not one block"
        )
    assert os.stat(out / f"{layout}.safetensors").st_mode & 0o044, "readable like any file the user creates"


@pytest.mark.parametrize("layout", ["ddp_ep", "fsdp_ep"])
def test_optimizer_state_gathers_to_one_process_and_loads_back(dist_run, layout):
    """AdamW moments of sharded experts (and FSDP shards) gathered = the one-process run's; reloaded at EP 2 = the same."""
    for rank in RANKS:
        r = dist_run[0][rank]["train"][layout]
        assert (
            r["opt_diff"] < 1e-12
            and r["opt_mag"] > 1e-3
            and r["opt_roundtrip"] == 0.0
            and r["opt_entries"] == r["file_keys"] - 2
        ), r


def test_fsdp_bf16_mixed_precision_trains_and_saves_fp32_masters(dist_run):
    for rank in RANKS:
        r = dist_run[0][rank]["train"]["fsdp_ep_bf16"]
        assert r["pred_dtype"] == "torch.bfloat16" and r["master_dtypes"] == ["torch.float32"], r
        assert "torch.float32" in r["file_dtypes"] and "torch.bfloat16" not in r["file_dtypes"]
        assert max(abs(a - b) / b for a, b in zip(r["losses"], r["ref_losses"])) < 2e-2, (
            r
        )  # bf16 compute, fp32 reference
        assert r["one_vs_reload_diff"] < 1e-6, "the saved fp32 masters load the same in one process and sharded"


def test_fsdp_parameters_a_rank_skipped_get_zero_gradients(dist_run):
    """Rank 1 skips a layer rank 0 uses (and one layer is never used): FSDP must reduce the same set on both."""
    for rank in RANKS:
        r = dist_run[0][rank]["fsdp_unused"]
        assert (
            r["grad_diff"] < 1e-12 and r["grad_mag"] > 0.01 and r["never_used_grad_max"] == 0.0 and r["params"] == 10
        ), r


def test_layouts_that_do_not_divide_are_named(dist_run):
    errs = dist_run[0][0]["errors"]
    assert "world size 2 is not a multiple of moe.expert_parallel=4" in errs["world"] and "torchrun" in errs["world"]
    assert "expert_parallel=2 but the EP group given has 1 ranks" in errs["group"]


# -- one process: no process group needed -------------------------------------------------------


def _layer(ep: int, num_experts: int = 4, **kw):
    torch.manual_seed(0)
    spec = W.moe_spec(W.TOPP, "swiglu", ep, num_null=1, num_shared=1, **kw)
    spec["params"]["num_experts"] = num_experts
    return audiomoe.component_builder("moe", spec)(d_model=W.D).double()


def test_expert_parallel_must_divide_num_experts():
    with pytest.raises(AudioMoEError, match=r"expert_parallel=4 does not divide moe.num_experts=6.*\[1, 2, 3, 6\]"):
        _layer(4, num_experts=6)
    with pytest.raises(AudioMoEError, match="expert_parallel=3 does not divide moe.num_experts=8"):
        audiomoe.compose("tiny-unimoe", overrides=["backbone.moe.expert_parallel=3"])


def test_unsharded_ep_layer_is_the_full_layer():
    """Built with expert_parallel=2 but never sharded (one process, a checkpoint read back): the full layer."""
    a, b = _layer(1), _layer(2)
    x = torch.randn(2, 5, W.D, dtype=torch.float64, requires_grad=True)
    ya, yb = a(x)[0], b(x)[0]
    assert b.ep_shard is None and torch.equal(ya, yb)
    ga = torch.autograd.grad(ya.square().sum(), [x, *a.parameters()])
    gb = torch.autograd.grad(yb.square().sum(), [x, *b.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(ga, gb))


def test_sharding_without_a_process_group_says_what_to_do(tmp_path):
    layer = _layer(2)
    with pytest.raises(AudioMoEError, match="torchrun.*init_process_group"):
        parallel.shard_experts(layer)
    with pytest.raises(AudioMoEError, match="apply_fsdp needs torch.distributed"):
        parallel.apply_fsdp(layer)
    with pytest.raises(AudioMoEError, match=r"param_dtype='bf17' is not a dtype; use one of .*bf16"):
        parallel.apply_fsdp(layer, param_dtype="bf17")
    with pytest.raises(AudioMoEError, match="does not exist; write one with save_full_safetensors"):
        parallel.load_full_safetensors(layer, tmp_path / "nope.safetensors")
    assert parallel.shard_experts(_layer(1)) == []  # nothing to shard: no process group needed


def test_full_checkpoint_round_trip_in_one_process(tmp_path):
    layer = _layer(2)
    path = tmp_path / "m.safetensors"
    parallel.save_full_safetensors(layer, path)
    assert _safetensors_header(path)["__metadata__"]["format"] == "audiomoe-full"
    other = _layer(1, capacity_factor=None)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    parallel.load_full_safetensors(other, path)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in other.state_dict().items())
    bad = {k: v for k, v in layer.state_dict().items() if "shared" not in k}
    with pytest.raises(AudioMoEError, match="missing .*shared"):
        parallel.load_full_state_dict(other, bad)


def test_a_model_built_on_the_meta_device_loads_the_full_checkpoint():
    """Build without memory (``torch.device("meta")``), then take the weights from a full state dict."""
    src = _layer(2)
    with torch.device("meta"):
        empty = audiomoe.component_builder("moe", W.moe_spec(W.TOPP, "swiglu", 2, num_null=1, num_shared=1))(
            d_model=W.D
        )
    parallel.load_full_state_dict(empty, src.state_dict())
    assert not any(p.is_meta for p in empty.parameters())
    x = torch.randn(7, W.D, dtype=torch.float64)
    assert torch.equal(empty(x)[0], src(x)[0])
