"""Issue 11, configs: nothing changes silently, nothing impossible is allocated, one clear line from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import audiomoe
import audiomoe.train
from audiomoe import cli
from audiomoe.core.composer import validate
from audiomoe.core.limits import MAX_QUOTED_VALUE

_HERE = Path(sys.executable).parent / "audiomoe"
EXE = [str(_HERE)] if _HERE.exists() else [sys.executable, "-m", "audiomoe.cli"]


def _moe_path() -> str:
    """Where tiny-moe-cls keeps its MoE knobs (``backbone`` or ``backbone.moe``, as the backbone nests them)."""
    params = audiomoe.compose("tiny-moe-cls").spec["backbone"]["params"]
    return "backbone.moe" if "moe" in params else "backbone"


MOE = _moe_path()


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed console script, in a subprocess."""
    return subprocess.run(
        EXE + list(args), capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    )


def one_error_line(out: subprocess.CompletedProcess, command: str) -> str:
    """The CLI failed with exit 2 and printed exactly one line, no traceback; return the message."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"audiomoe {command}: error: "), out.stderr
    return lines[0]


def main_error(capsys, *argv: str) -> str:
    """``cli.main`` in-process: exit 2, one stderr line, no traceback; return it."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_a_null_task_removes_the_head_and_an_unknown_one_is_an_error():
    model = audiomoe.compose("tiny-moe-cls", ["tasks.emotion=null"])
    assert list(model.spec["tasks"]) == ["speaker"] and list(model.heads) == ["speaker"]
    with pytest.raises(audiomoe.ConfigError, match="no head 'emotio' under 'tasks' to remove. Did you mean 'emotion'"):
        audiomoe.compose("tiny-moe-cls", ["tasks.emotio=null"])
    with pytest.raises(audiomoe.ConfigError, match="a model needs at least one task head"):
        audiomoe.compose("tiny-cls", ["tasks.cls=null"])


@pytest.mark.parametrize(
    "override", [f"{MOE}.num_experts=yes", f"{MOE}.router.k=on", "d_model=true", "encoder.kernels=[10, no, 4]"]
)
def test_booleans_are_not_numbers(override):
    with pytest.raises(
        audiomoe.ConfigError, match=r"expected a number, got a boolean .*YAML reads yes/no/on/off as booleans"
    ):
        audiomoe.compose("tiny-moe-cls", [override])


def test_boolean_params_still_take_yaml_booleans():
    assert audiomoe.compose("tiny-cls", ["encoder.normalize=no"]).spec["encoder"]["params"]["normalize"] is False


def test_duplicate_yaml_keys_are_refused_naming_the_lines(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("preset: tiny-cls\nd_model: 16\nencoder: {name: conv_frontend}\nd_model: 64\n")
    with pytest.raises(
        audiomoe.AudioMoEError, match=r"duplicate key 'd_model' at line 4 \(first given at line 2\); keep one"
    ):
        audiomoe.compose(str(cfg))
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "preset: tiny-cls\ntasks:\n  cls: {name: classification, params: {num_classes: 3, num_classes: 5}}\n"
    )
    with pytest.raises(audiomoe.AudioMoEError, match="duplicate key 'num_classes' at line 3"):
        audiomoe.compose(str(nested))


def test_validate_runs_every_constructor_check(tmp_path):
    out = run_cli("validate", "tiny-moe-cls", "--set", f"{MOE}.router.k=9")
    line = one_error_line(out, "validate")
    assert "k=9 is larger than the number of columns (4)" in line and "OK" not in out.stderr and not out.stdout
    with pytest.raises(audiomoe.AudioMoEError, match="k=9 is larger"):
        audiomoe.compose("tiny-moe-cls", [f"{MOE}.router.k=9"])  # what validate now predicts
    _, n = validate("tiny-moe-cls")
    assert n == sum(p.numel() for p in audiomoe.compose("tiny-moe-cls").parameters())


def test_impossible_sizes_fail_before_any_allocation():
    with pytest.raises(
        audiomoe.ConfigError, match=r"d_model = 1000000000: Input should be less than or equal to 65536"
    ):
        audiomoe.compose("tiny-cls", ["d_model=1000000000"])
    t0 = time.monotonic()
    with pytest.raises(
        audiomoe.AudioMoEError,
        match=r"this spec builds [\d,]{15,} parameters \([\d,]+ GiB in float32\), over the limit of 20,000,000,000",
    ):
        validate("tiny-moe-cls", [f"{MOE}.expert.d_ff=1000000000"])
    with pytest.raises(audiomoe.AudioMoEError, match="over the limit"):  # train validates before composing
        audiomoe.train.train(
            "tiny-moe-cls", [f"{MOE}.expert.d_ff=1000000000"], audiomoe.train.TrainConfig(steps=1, progress=False)
        )
    assert time.monotonic() - t0 < 10


def test_billion_laughs_and_deep_nesting_fail_fast_with_short_messages(tmp_path, capsys):
    lol = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lol += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lol + ["d_model: *a8"]) + "\n")
    t0 = time.monotonic()
    with pytest.raises(audiomoe.AudioMoEError) as exc:
        audiomoe.compose(str(bomb))
    assert (
        time.monotonic() - t0 < 2
        and "expands to more than 100,000 values" in str(exc.value)
        and len(str(exc.value)) < 300
    )
    deep = tmp_path / "deep.yaml"
    deep.write_text("d_model: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nesting deeper than 64 levels at line 1" in main_error(capsys, "validate", str(deep))
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &x [1, *x]\npreset: tiny-cls\n")
    with pytest.raises(audiomoe.AudioMoEError, match="not valid YAML|refers to itself"):
        audiomoe.compose(str(loop))


def test_long_values_are_cut_in_messages():
    with pytest.raises(audiomoe.ConfigError) as exc:
        audiomoe.compose("tiny-cls", ["d_model=" + "x" * 5000])
    assert "x" * MAX_QUOTED_VALUE not in str(exc.value) and len(str(exc.value)) < 3 * MAX_QUOTED_VALUE


def test_binary_and_odd_config_files_are_one_line_errors(tmp_path, capsys):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    assert "is a binary file, not YAML text" in main_error(capsys, "validate", str(binary))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("d_model: 32 # caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in main_error(capsys, "validate", str(latin))
    listing = tmp_path / "list.yaml"
    listing.write_text("- d_model\n")
    assert "must hold a mapping (d_model, encoder, tasks, ...), not list" in main_error(
        capsys, "validate", str(listing)
    )
    tagged = tmp_path / "tag.yaml"
    tagged.write_text("d_model: !!python/object/apply:os.system ['true']\n")
    assert "is not valid YAML" in main_error(capsys, "validate", str(tagged))
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    assert "is not a file" in main_error(capsys, "validate", str(folder))


def test_a_config_that_includes_itself_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("preset: b.yaml\n".replace("b.yaml", str(tmp_path / "b.yaml")))
    (tmp_path / "b.yaml").write_text(f"preset: {tmp_path / 'a.yaml'}\nd_model: 8\n")
    with pytest.raises(audiomoe.AudioMoEError, match=r"includes itself through 'preset:'"):
        audiomoe.compose(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("preset: 3\n")
    with pytest.raises(audiomoe.AudioMoEError, match="'preset' must be a preset name or YAML path"):
        audiomoe.compose(str(tmp_path / "c.yaml"))


def test_seeds_are_bounded(capsys):
    big = str(2**80)
    assert "seed (1208925819614629174706176) must be an integer in [0, 4294967295]" in main_error(
        capsys, "train", "tiny-cls", "--seed", big
    )
    assert "seed = 1208925819614629174706176: Input should be less than or equal to 4294967295" in main_error(
        capsys, "validate", "tiny-cls", "--set", f"seed={big}"
    )
    assert "Input should be greater than or equal to 0" in main_error(
        capsys, "validate", "tiny-cls", "--set", "seed=-1"
    )


def test_save_spec_into_a_directory_or_a_missing_parent(tmp_path, capsys):
    line = one_error_line(run_cli("compose", "tiny-cls", "--save-spec", str(tmp_path)), "compose")
    assert f"--save-spec '{tmp_path}' is a directory; give a file name" in line
    assert "does not exist; create it first" in main_error(
        capsys, "compose", "tiny-cls", "--save-spec", str(tmp_path / "no" / "spec.yaml")
    )
    assert cli.main(["compose", "tiny-cls", "--save-spec", str(tmp_path / "spec.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "spec.yaml").read_text())["d_model"] == 32


def test_training_options_are_checked_up_front(tmp_path, capsys):
    line = one_error_line(
        run_cli("train", "tiny-cls", "--eval-every", "0", "--lr", "nan", "--out", str(tmp_path / "r")), "train"
    )
    assert (
        "eval_every (0) must be an integer in [1, " in line and "lr (nan) must be a finite number in (0, 10.0]" in line
    )
    assert not (tmp_path / "r").exists()  # refused before the run directory was even created
    assert "lr (-1.0) must be a finite number in (0, 10.0]" in main_error(capsys, "train", "tiny-cls", "--lr", "-1")
    assert "batch_size (1000000000) must be an integer in [1, 4096]" in main_error(
        capsys, "train", "tiny-cls", "--batch-size", str(10**9)
    )
    assert "resume and overwrite exclude each other" in main_error(
        capsys, "train", "tiny-cls", "--out", str(tmp_path / "x"), "--resume", "--overwrite"
    )
    (tmp_path / "file").write_text("keep me")
    assert "--out '" + str(tmp_path / "file") + "' is a file, not a directory" in main_error(
        capsys, "train", "tiny-cls", "--out", str(tmp_path / "file")
    )
    assert (tmp_path / "file").read_text() == "keep me"
    assert "nothing to resume in" in main_error(capsys, "train", "--resume", str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    assert "give a PRESET (or YAML path) to train, or --resume DIR" in main_error(capsys, "train")


def test_an_unexpected_error_is_one_line_with_a_debug_hint(capsys, monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("audiomoe.core.composer.validate", boom)
    monkeypatch.delenv("AUDIOMOE_DEBUG", raising=False)
    assert cli.main(["validate", "tiny-cls"]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "audiomoe validate: unexpected error: ZeroDivisionError: division by zero (set AUDIOMOE_DEBUG=1 for the traceback, and please report it)"
    )
    monkeypatch.setenv("AUDIOMOE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["validate", "tiny-cls"])


def _dist(site: Path, dist: str, metadata: str, module: str, code: str) -> None:
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(metadata)
    (info / "entry_points.txt").write_text(f"[audiomoe]\n{module} = {module}\n")
    (site / f"{module}.py").write_text(code)


def test_broken_plugins_never_break_the_cli(tmp_path):
    site = tmp_path / "site"
    _dist(site, "noname", "Metadata-Version: 2.1\nVersion: 1.0\n", "nonameplug", "")  # a dist-info with no Name
    _dist(
        site, "exiter", "Metadata-Version: 2.1\nName: exiter\nVersion: 1.0\n", "exitplug", "import sys\nsys.exit(3)\n"
    )
    _dist(
        site,
        "argv-reader",
        "Metadata-Version: 2.1\nName: argv-reader\nVersion: 1.0\n",
        "argvplug",
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('--mine', required=True)\np.parse_args()\n",
    )
    env = {"PYTHONPATH": str(site)}
    out = run_cli("plugins", env=env)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
    assert "failed" in rows["exitplug"] and "SystemExit: 3" in rows["exitplug"]
    assert "failed" in rows["argvplug"] and "SystemExit: 2" in rows["argvplug"]
    assert rows["nonameplug"].split()[1] == "?"
    listing = run_cli("list", "preset", env=env)
    assert listing.returncode == 0 and "tiny-cls" in listing.stdout
