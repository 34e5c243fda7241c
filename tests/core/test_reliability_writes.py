"""Issue 24, writes: every output is written whole or not at all, and never over the command's own input.

Disk-full is a real file-size limit (``RLIMIT_FSIZE`` in a subprocess, SIGXFSZ ignored so that a
write past it raises ``OSError(EFBIG)`` exactly as a full disk raises ``ENOSPC``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import audiomoe
from audiomoe import cli
from audiomoe.core.atomic import OutputError, atomic_open, check_output, write_text


def _wavs(root: Path, n: int = 3) -> None:
    (root / "wav").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(root / "wav" / f"{i}.wav", np.zeros(800, np.float32), 16000)


def _csv(root: Path, rows: int, name: str = "labels.csv") -> Path:
    _wavs(root)
    path = root / name
    path.write_text("file,label,duration\n" + "".join(f"wav/{i % 3}.wav,label-{i:05d},0.05\n" for i in range(rows)))
    return path


def _main_error(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit raises OSError(EFBIG), as a full disk does
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from audiomoe.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _run_limited(limit: int, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", LIMITED, str(limit), *argv], capture_output=True, text=True, env=env, timeout=300
    )


def test_disk_full_during_from_csv_keeps_the_old_manifest_and_leaves_no_temp_file(tmp_path):
    csv_path = _csv(tmp_path, rows=400)  # about 30 KB of manifest
    out = tmp_path / "manifest.jsonl"
    old = '{"audio": "wav/0.wav", "task": "cls", "target": "old"}\n'
    out.write_text(old)
    r = _run_limited(8192, "data", "from-csv", str(csv_path), str(out), "--task", "cls")
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"cannot write manifest '{out}'" in err and "File too large" in err and "ulimit" in err
    assert "nothing was changed" in err
    assert out.read_text() == old  # the old manifest, whole
    assert _leftovers(tmp_path) == []
    r = _run_limited(10**8, "data", "from-csv", str(csv_path), str(out), "--task", "cls")  # with room: written whole
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 400 and _leftovers(tmp_path) == []


def test_disk_full_during_save_spec_keeps_the_old_file(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("old: spec\n")
    r = _run_limited(64, "compose", "tiny-cls", "--save-spec", str(spec), "--no-probe")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot write --save-spec '{spec}'" in r.stderr and "File too large" in r.stderr
    assert spec.read_text() == "old: spec\n" and _leftovers(tmp_path) == []


def test_from_csv_never_writes_over_its_own_csv(tmp_path, capsys):
    csv_path = _csv(tmp_path, rows=3)
    before = csv_path.read_bytes()
    for out in (csv_path, tmp_path / "wav" / ".." / csv_path.name):
        err = _main_error(capsys, "data", "from-csv", str(csv_path), str(out), "--task", "cls")
        assert "is the same file as the input" in err and "give another output path" in err
    link = tmp_path / "link.jsonl"
    link.symlink_to(csv_path)  # a link to the CSV is the CSV
    err = _main_error(capsys, "data", "from-csv", str(csv_path), str(link), "--task", "cls")
    assert "is the same file as the input" in err
    assert csv_path.read_bytes() == before


def test_from_csv_output_that_is_a_directory_or_a_link_loop_is_named(tmp_path, capsys):
    csv_path = _csv(tmp_path, rows=3)
    err = _main_error(capsys, "data", "from-csv", str(csv_path), str(tmp_path / "wav"), "--task", "cls")
    assert f"output manifest '{tmp_path / 'wav'}' is a directory" in err
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    err = _main_error(capsys, "data", "from-csv", str(csv_path), str(tmp_path / "a"), "--task", "cls")
    assert "is a symbolic link loop" in err
    err = _main_error(capsys, "data", "from-csv", str(tmp_path / "a"), str(tmp_path / "m.jsonl"), "--task", "cls")
    assert f"cannot read CSV file '{tmp_path / 'a'}'" in err and "symbolic links" in err


def test_a_missing_csv_is_a_clean_error(tmp_path, capsys):
    err = _main_error(
        capsys, "data", "from-csv", str(tmp_path / "nope.csv"), str(tmp_path / "m.jsonl"), "--task", "cls"
    )
    assert err == f"audiomoe data: error: CSV file '{tmp_path / 'nope.csv'}' does not exist; check the path"
    assert not (tmp_path / "m.jsonl").exists()


def test_the_writer_removes_its_temp_file_when_the_block_fails_and_keeps_the_old_content(tmp_path):
    out = tmp_path / "report.md"
    out.write_text("old")
    with pytest.raises(KeyError):
        with atomic_open(out) as fh:
            fh.write("half a new report")
            raise KeyError("the caller failed mid-write")
    assert out.read_text() == "old" and _leftovers(tmp_path) == []
    write_text(out, "new")
    assert out.read_text() == "new" and _leftovers(tmp_path) == []


def test_written_files_get_ordinary_permissions_and_links_stay_links(tmp_path, capsys):
    mask = os.umask(0o022)
    try:
        assert cli.main(["compose", "tiny-cls", "--save-spec", str(tmp_path / "spec.yaml"), "--no-probe"]) == 0
    finally:
        os.umask(mask)
    assert (tmp_path / "spec.yaml").stat().st_mode & 0o777 == 0o644  # a temp file's 0600 would hide it from others
    real = tmp_path / "real.txt"
    real.write_text("old")
    os.chmod(real, 0o640)
    (tmp_path / "link.txt").symlink_to(real)
    write_text(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink() and real.read_text() == "new" and real.stat().st_mode & 0o777 == 0o640


def test_check_output_refuses_before_any_work(tmp_path):
    with pytest.raises(OutputError, match="folder '.*missing' does not exist; create it first"):
        check_output(tmp_path / "missing" / "x.json", what="--json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        check_output(tmp_path / "file" / "x.json")
    assert check_output(tmp_path / "new" / "x.json", make_parent=True) == tmp_path / "new" / "x.json"
    assert (tmp_path / "new").is_dir()


def test_eval_json_into_a_missing_folder_is_refused_before_the_eval(tmp_path, capsys):
    from audiomoe.train import save_checkpoint

    save_checkpoint(audiomoe.compose("tiny-cls"), tmp_path / "run", 1)
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text("not json\n")  # the eval would fail on it: the output is checked first
    err = _main_error(
        capsys, "eval", str(tmp_path / "run"), "--data", str(bad_data), "--json", str(tmp_path / "no" / "e.json")
    )
    assert f"--json '{tmp_path / 'no' / 'e.json'}': folder '{tmp_path / 'no'}' does not exist" in err
    err = _main_error(capsys, "eval", str(tmp_path / "run"), "--data", str(bad_data), "--json", str(bad_data))
    assert "is the same file as the input" in err and bad_data.read_text() == "not json\n"
    assert cli.main(["eval", str(tmp_path / "run"), "--data", "tones", "--json", str(tmp_path / "e.json")]) == 0
    assert "tasks" in json.loads((tmp_path / "e.json").read_text()) and _leftovers(tmp_path) == []


def test_report_on_a_study_whose_plan_lacks_keys_is_a_clean_error(tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    plan = {
        "configs": [{"name": "a", "target": "tiny-cls"}],
        "seeds": [0],
        "baselines": {},
        "skipped": {},
        "metric": "mean/accuracy",
    }
    (study / "plan.json").write_text(json.dumps(plan))  # no measure_batches
    err = _main_error(capsys, "report", str(study))
    assert f"{study / 'plan.json'}: key 'measure_batches' must be an integer, it is missing" in err
    assert "audiomoe ablate" in err
    (study / "plan.json").write_text(json.dumps({**plan, "measure_batches": 4, "configs": [{"name": "a"}]}))
    assert "configs[0] needs a string 'name' and 'target'" in _main_error(capsys, "report", str(study))
