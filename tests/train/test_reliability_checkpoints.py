"""Issue 11, checkpoints and run directories: nothing is ever lost, nothing foreign is ever loaded."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import audiomoe
from audiomoe.train import (
    CheckpointError,
    RunDirError,
    TrainConfig,
    load_checkpoint,
    load_trainer_state,
    save_checkpoint,
    train,
)
from audiomoe.train import checkpoint as ckpt_mod
from audiomoe.train.rundir import open_run_dir

_HERE = Path(sys.executable).parent / "audiomoe"
EXE = [str(_HERE)] if _HERE.exists() else [sys.executable, "-m", "audiomoe.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = dict(batch_size=2, eval_batches=0, progress=False)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".lock")


@pytest.fixture(scope="module")
def model():
    return audiomoe.compose("tiny-cls")


def test_pruning_is_by_step_number_past_a_million(tmp_path, model):
    for step in (999_800, 999_900, 1_000_000):
        save_checkpoint(model, tmp_path, step, keep=2)
    # by name, step-1000000 sorts first and was deleted as soon as it was written
    assert _dirs(tmp_path) == ["latest", "step-1000000", "step-999900"]
    assert (tmp_path / "latest").read_text().strip() == "step-1000000"
    load_checkpoint(tmp_path)


def test_a_lower_step_saved_later_is_kept_and_latest_stays_valid(tmp_path, model):
    save_checkpoint(model, tmp_path, 40, keep=1)
    newest = save_checkpoint(model, tmp_path, 10, keep=1)  # the old code pruned the one it just wrote
    assert newest.is_dir() and (tmp_path / "latest").read_text().strip() == "step-000010"
    assert (tmp_path / "step-000040").is_dir()  # the highest step is never pruned either
    load_checkpoint(tmp_path)


def test_a_run_its_latest_pointer_or_a_step_dir_all_load_the_same_checkpoint(tmp_path, model):
    """What a user types after training (the run, run/latest, run/step-N) names the newest checkpoint; a plain file does not."""
    from audiomoe.train.checkpoint import resolve_checkpoint

    save_checkpoint(model, tmp_path, 5, keep=2)
    newest = save_checkpoint(model, tmp_path, 7, keep=2)
    assert (
        resolve_checkpoint(tmp_path) == resolve_checkpoint(tmp_path / "latest") == newest == resolve_checkpoint(newest)
    )
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="notes.txt' is not an audiomoe checkpoint"):
        resolve_checkpoint(tmp_path / "notes.txt")


def test_resaving_a_step_moves_the_new_one_in_before_removing_the_old(tmp_path, model, monkeypatch):
    save_checkpoint(model, tmp_path, 5)
    good = _weights(model)
    changed = audiomoe.compose("tiny-cls", ["seed=1"])
    real, calls = os.replace, []

    def dies_on_second_rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old copy moved aside, new copy not yet in: the old code had neither
            raise KeyboardInterrupt("kill")
        real(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(changed, tmp_path, 5)
    monkeypatch.setattr(os, "replace", real)
    assert calls[0][0] == "step-000005" and calls[0][1].startswith(".old-step-000005.")
    assert _same(load_checkpoint(tmp_path).state_dict(), good)  # read from the aside copy
    ckpt_mod.clean_run_dir(tmp_path)  # the next save repairs it first
    assert (tmp_path / "step-000005").is_dir() and not list(tmp_path.glob(".old-*"))
    save_checkpoint(changed, tmp_path, 5)
    assert _same(load_checkpoint(tmp_path).state_dict(), _weights(changed))


@pytest.mark.parametrize(
    "pointer", ["../other-run/step-000001", "/etc", "step-000001/../../x", "model.safetensors", ""]
)
def test_latest_is_only_followed_to_a_step_dir_of_this_run(tmp_path, model, pointer):
    other = tmp_path / "other-run"
    save_checkpoint(model, other, 1)
    run = tmp_path / "run"
    save_checkpoint(model, run, 1)
    (run / "latest").write_text(pointer)
    with pytest.raises(CheckpointError, match="it may only name a step-N directory of this run"):
        load_checkpoint(run)


def test_latest_naming_a_missing_or_incomplete_step_is_a_clear_error(tmp_path, model):
    save_checkpoint(model, tmp_path, 1)
    (tmp_path / "latest").write_text("step-000005\n")
    with pytest.raises(CheckpointError, match=f"names step-000005, which does not exist in '{tmp_path}'"):
        load_checkpoint(tmp_path)
    (tmp_path / "step-000005").mkdir()
    with pytest.raises(CheckpointError, match=r"step-000005' is incomplete \(missing model.safetensors, spec.yaml\)"):
        load_checkpoint(tmp_path)


def test_latest_through_a_symlink_out_of_the_run_is_refused(tmp_path, model):
    save_checkpoint(model, tmp_path / "other", 1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "step-000002").symlink_to(tmp_path / "other" / "step-000001")
    (run / "latest").write_text("step-000002\n")
    with pytest.raises(CheckpointError, match="points outside the run directory"):
        load_checkpoint(run)


def test_temp_dirs_of_dead_writers_are_removed_by_the_next_save(tmp_path, model):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = [
        tmp_path / f".step-000003.{pid}.abcd",
        tmp_path / f".del-step-000001.{pid}.ef01",
        tmp_path / f".step-000004.{os.getpid()}.zz",
    ]
    (tmp_path / f".latest.{pid}.tmp").write_text("step-000003")
    for p in stale:
        p.mkdir(parents=True)
        (p / "model.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".step-000009.{os.getppid()}.live"  # a live writer's temp dir is left alone
    alive.mkdir()
    half = tmp_path / "step-000002"  # what a kill in the middle of pruning's rmtree used to leave
    half.mkdir()
    (half / "spec.yaml").write_text("d_model: 32\n")
    save_checkpoint(model, tmp_path, 7)
    assert _dirs(tmp_path) == sorted([alive.name, "latest", "step-000007"])


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
        ),
    ],
)
def test_disk_full_mid_save_names_the_step_and_the_intact_checkpoint(tmp_path, model, monkeypatch, failure):
    save_checkpoint(model, tmp_path, 10)
    before = _dirs(tmp_path)

    def full(state, path):
        Path(path).write_bytes(b"\0" * 100)
        raise failure

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(model, tmp_path, 20)
    assert (
        str(exc.value)
        == f"disk full while writing step 20 in '{tmp_path}'; the previous checkpoint step-000010 is intact"
    )
    assert _dirs(tmp_path) == before  # no half-written temp dir is left
    monkeypatch.undo()
    load_checkpoint(tmp_path)


def test_checkpoints_load_without_pickle_and_damaged_files_are_named(tmp_path, model, monkeypatch):
    opt = torch.optim.AdamW(model.parameters())
    model(audiomoe.AudioBatch(torch.randn(2, 4000), 16000, "cls", targets=[0, 1])).loss.backward()
    opt.step()
    path = save_checkpoint(model, tmp_path, 3, opt, extra={"note": "x"})
    assert not list(path.glob("*.pt"))

    def no_pickle(*a, **k):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    opt2 = torch.optim.AdamW(audiomoe.compose("tiny-cls").parameters())
    state = load_trainer_state(tmp_path, opt2)
    assert state["step"] == 3 and state["extra"] == {"note": "x"}
    saved, loaded = opt.state_dict(), opt2.state_dict()
    assert all(torch.equal(saved["state"][i]["exp_avg"], loaded["state"][i]["exp_avg"]) for i in saved["state"])
    weights = path / "model.safetensors"
    for damage in (b"", weights.read_bytes()[:200]):  # empty, truncated
        weights.write_bytes(damage)
        with pytest.raises(CheckpointError, match=f"'{weights}' is damaged .*load an earlier checkpoint"):
            load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "text, match",
    [
        (b"- a\n- b\n", "must hold a model spec mapping, not list"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "is a binary file"),
        (b"d_model: !!python/object/apply:os.system ['echo hi']\n", "not valid YAML"),
        (b"\xff\xfe d_model: 3", "not UTF-8"),
    ],
)
def test_a_bad_spec_yaml_in_a_checkpoint_is_a_clear_error(tmp_path, model, text, match):
    path = save_checkpoint(model, tmp_path, 1)
    (path / "spec.yaml").write_bytes(text)
    with pytest.raises(audiomoe.AudioMoEError, match=match) as exc:
        load_checkpoint(tmp_path)
    assert "spec.yaml" in str(exc.value)


def test_resume_continues_exactly_where_an_unbroken_run_would_be(tmp_path):
    # a constant lr: extending a 3-step run to 6 under a decaying schedule would change the lr of the steps done
    whole = train("tiny-cls", (), TrainConfig(steps=6, out_dir=str(tmp_path / "a"), schedule="constant", **FAST))
    train("tiny-cls", (), TrainConfig(steps=3, out_dir=str(tmp_path / "b"), schedule="constant", **FAST))
    resumed = train(
        None, (), TrainConfig(steps=6, out_dir=str(tmp_path / "b"), resume=True, schedule="constant", **FAST)
    )
    assert resumed["start_step"] == 3 and whole["final_loss"] == resumed["final_loss"]
    assert _same(load_checkpoint(tmp_path / "a").state_dict(), load_checkpoint(tmp_path / "b").state_dict())
    with pytest.raises(audiomoe.AudioMoEError, match="already at step 6; ask for more --steps"):
        train(None, (), TrainConfig(steps=6, out_dir=str(tmp_path / "b"), resume=True, **FAST))
    with pytest.raises(audiomoe.AudioMoEError, match="different spec"):
        train("tiny-cls", ["seed=5"], TrainConfig(steps=9, out_dir=str(tmp_path / "b"), resume=True, **FAST))


def test_a_run_directory_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    train("tiny-cls", (), TrainConfig(steps=2, out_dir=str(out), **FAST))
    first = _weights(load_checkpoint(out))
    with pytest.raises(
        RunDirError, match=r"already holds a training run \(checkpoints up to step 2\); continue it with --resume"
    ):
        train("tiny-moe-cls", (), TrainConfig(steps=1, out_dir=str(out), **FAST))
    assert _same(_weights(load_checkpoint(out)), first)  # nothing of the first run was touched
    (out / "notes.txt").write_text("mine")
    for name in ("eval-test.json", "measure.json", "report.md", "report.html"):  # eval / report outputs of the old run
        (out / name).write_text("{}")
    (out / "plots").mkdir()
    train("tiny-moe-cls", (), TrainConfig(steps=1, out_dir=str(out), overwrite=True, **FAST))
    assert _dirs(out) == ["latest", "notes.txt", "run.json", "step-000001", "summary.json"]  # only our files went
    assert "backbone" in load_checkpoint(out).spec


def test_a_locked_run_directory_is_refused_by_a_second_train(tmp_path):
    run = open_run_dir(tmp_path / "run")
    try:
        out = subprocess.run(
            EXE + ["train", "tiny-cls", "--steps", "1", "--out", str(tmp_path / "run"), "--resume"],
            capture_output=True,
            text=True,
            env=ENV,
        )
    finally:
        run.close()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"audiomoe train: error: '{tmp_path / 'run'}' is in use by another `audiomoe train` (pid {os.getpid()}, since "
        + out.stderr.split("since ")[1].split(")")[0]
        + "); wait for it to finish or give another --out"
    ]
    assert not (tmp_path / "run" / "latest").exists()


def test_out_that_is_a_file_fails_before_training(tmp_path):
    (tmp_path / "f").write_text("x")
    t0 = time.monotonic()
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        train("tiny-cls", (), TrainConfig(steps=10**6, out_dir=str(tmp_path / "f"), **FAST))
    assert time.monotonic() - t0 < 5 and (tmp_path / "f").read_text() == "x"
    with pytest.raises(RunDirError, match="cannot use --out"):
        train("tiny-cls", (), TrainConfig(steps=1, out_dir=str(tmp_path / "f" / "sub"), **FAST))


def test_ctrl_c_stops_cleanly_and_names_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        EXE
        + [
            "train",
            "tiny-cls",
            "--steps",
            "1000000",
            "--save-every",
            "1",
            "--batch-size",
            "2",
            "--eval-batches",
            "0",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        # a shell that starts the suite in the background (nohup, `&`) makes it ignore SIGINT, and the child would
        # inherit that (Python then installs no KeyboardInterrupt handler): a user's terminal delivers Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    t0 = time.monotonic()
    while not (out / "latest").exists() and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("audiomoe train: interrupted at step ") and "; the last good checkpoint is " in last
    named = Path(last.split("the last good checkpoint is ")[1])
    assert named == ckpt_mod.read_latest(out)
    load_checkpoint(named)
