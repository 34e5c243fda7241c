"""The ``audiomoe`` command line, run as a real subprocess (the installed console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# The console script installed next to this interpreter (not whichever `audiomoe` is first on PATH).
_HERE = Path(sys.executable).parent / "audiomoe"
EXE = str(_HERE) if _HERE.exists() else ""


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [EXE, *args] if EXE else [sys.executable, "-m", "audiomoe.cli", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if ok and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def test_help_lists_every_command():
    out = run("--help").stdout
    for cmd in ("plugins", "list", "describe", "validate", "compose", "train"):
        assert cmd in out


def test_plugins_shows_builtin_with_version():
    data = json.loads(run("plugins", "--json").stdout)
    builtin = next(p for p in data if p["name"] == "builtin")
    assert builtin["status"] == "loaded" and builtin["version"] and builtin["components"] >= 5


def test_list_kind_and_glob():
    out = run("list", "router", "linear*").stdout
    assert "top_k" in out and "conv_frontend" not in out
    assert "tiny-moe-cls" in run("list", "preset").stdout
    bad = run("list", "routr", ok=False)
    assert bad.returncode == 2 and "unknown kind 'routr'. Did you mean 'router'?" in bad.stderr


def test_describe_shows_types_defaults_limits_and_example():
    out = run("describe", "router/top_k").stdout
    assert "k" in out and "int" in out and ">= 1" in out and "columns selected per item" in out
    assert "injected by the composer (not params): d_model, num_experts" in out
    assert "example:" in out and "name: top_k" in out
    info = json.loads(run("describe", "backbone/moe_transformer", "--json").stdout)
    slots = {p["name"]: p["slot"] for p in info["params"]}
    assert slots["moe"] == "moe"
    info = json.loads(run("describe", "moe/moe", "--json").stdout)
    slots = {p["name"]: p["slot"] for p in info["params"]}
    assert slots["router"] == "router" and slots["expert"] == "expert"


def test_validate_prints_resolved_spec_and_reports_all_problems(tmp_path):
    out = run("validate", "tiny-moe-cls", "--set", "backbone.moe.router.k=1")
    spec = yaml.safe_load(out.stdout)
    assert spec["backbone"]["params"]["moe"]["params"]["router"]["params"]["k"] == 1
    bad = run(
        "validate", "tiny-moe-cls", "--set", "backbone.moe.router.k=0", "--set", "backbone.num_layerz=2", ok=False
    )
    assert bad.returncode == 2
    assert (
        "has 2 problems" in bad.stderr
        and "backbone.moe.router.k = 0" in bad.stderr
        and "Did you mean 'num_layers'?" in bad.stderr
    )


def test_compose_prints_parts_plugins_and_parameter_counts(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    out = run("compose", "tiny-moe-cls", "--set", "backbone.moe.router.k=1", "--save-spec", str(spec_file)).stdout
    assert "router/top_k" in out and "builtin" in out and "expert/mlp" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("parameters:"))
    total = int(line.split("total ")[1].split()[0].replace(",", ""))
    active = int(line.split("active per token ")[1].split()[0].replace(",", ""))
    assert 0 < active < total
    assert yaml.safe_load(spec_file.read_text())["backbone"]["params"]["moe"]["params"]["router"]["params"]["k"] == 1


def test_compose_measures_top_p_active_parameters_with_a_probe():
    def counts(*extra):
        line = next(
            ln for ln in run("compose", "tiny-unimoe", *extra).stdout.splitlines() if ln.startswith("parameters:")
        )
        total = int(line.split("total ")[1].split()[0].replace(",", ""))
        return total, int(line.split("active per token ")[1].split()[0].replace(",", "")), line

    total, static, line = counts("--no-probe")
    assert static == total and "measured" not in line  # top-p before any forward: the upper bound
    total2, measured, line = counts()
    assert total2 == total and measured < total and "measured on 2 noise clips" in line
    import audiomoe

    model = audiomoe.compose("tiny-unimoe")
    model.train()
    model.probe()
    assert model.training  # the probe restores the mode
    per_layer = [b.moe.last_stats["routed_per_token"] for b in model.backbone.blocks]
    assert all(1 <= k <= 8 for k in per_layer)
    assert audiomoe.count_parameters(model)[1] == pytest.approx(measured, abs=1)
