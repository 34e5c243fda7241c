"""Issue 24, resuming: a missing or damaged ``latest`` falls back to the newest intact checkpoint (saying so),
``--resume RUN/step-N`` continues from that step, and ``trainer.json`` is validated like a recipe.

Every run is a real tiny training run through the real CLI (``audiomoe.cli.main``) on real files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import audiomoe
from audiomoe import cli
from audiomoe.train import CheckpointError, load_trainer_state, save_checkpoint

ARGS = [
    "--data",
    "tones",
    "--batch-size",
    "2",
    "--eval-batches",
    "0",
    "--save-every",
    "1",
    "--keep",
    "0",
    "--device",
    "cpu",
    "--json",
]


def _train(capsys, out: Path, *extra: str) -> tuple[dict, str]:
    """``audiomoe train`` in-process; returns (the summary it printed, its stderr)."""
    assert cli.main(["train", *extra, *ARGS, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def run(tmp_path, capsys) -> Path:
    """A 4-step run of tiny-cls with every checkpoint kept (step-000001 .. step-000004)."""
    out = tmp_path / "run"
    _train(capsys, out, "tiny-cls", "--steps", "3")
    return out


def test_a_deleted_latest_resumes_from_the_newest_intact_checkpoint_and_says_so(run, capsys):
    (run / "latest").unlink()
    summary, err = _train(capsys, run, "--resume", "--steps", "5")
    assert summary["start_step"] == 3, summary  # not a silent restart from step 0 over the old checkpoints
    assert f"'{run / 'latest'}' is missing; resuming from step-000003, the newest intact checkpoint" in err, err
    assert any("resuming from step-000003" in w["warning"] for w in summary["warnings"])
    assert (run / "latest").read_text().strip() == "step-000005"


@pytest.mark.parametrize("damage", ["truncated", "nan", "trainer"])
def test_a_damaged_latest_resumes_from_the_newest_intact_checkpoint(run, capsys, damage):
    latest = run / "step-000003"
    if damage == "truncated":
        weights = latest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:300])
        why = "its model.safetensors is damaged"
    elif damage == "nan":  # what an older version let a NaN gradient write
        state = _weights(latest)
        state[next(iter(state))][0] = float("nan")
        save_file(state, str(latest / "model.safetensors"))
        why = f"its weight '{next(iter(state))}' holds NaN or inf"
    else:
        meta = json.loads((latest / "trainer.json").read_text())
        (latest / "trainer.json").write_text(json.dumps({**meta, "step": -3}))
        why = "field 'step': Input should be greater than or equal to 0"
    good = _weights(run / "step-000002")
    summary, err = _train(capsys, run, "--resume", "--steps", "4")
    assert summary["start_step"] == 2, summary
    assert "the checkpoint 'latest' names (step-000003) cannot be resumed: " in err and why in err, err
    assert "resuming from step-000002, the newest intact checkpoint" in err, err
    assert not _same(good, _weights(run / "step-000004"))  # it trained on from there


def test_resume_takes_a_step_directory_and_ends_where_the_unbroken_run_did(run, capsys):
    unbroken = _weights(run / "step-000003")
    summary, err = _train(capsys, run, "--resume", str(run / "step-000001"))  # a recorded run: no --steps needed
    assert summary["start_step"] == 1 and "resuming " + str(run) + " from step-000001 (step 1)" in err, err
    assert _same(_weights(run / "step-000003"), unbroken)  # bit-identical on CPU: the same run, continued
    assert (run / "latest").read_text().strip() == "step-000003"


def test_resume_with_nothing_intact_or_a_bad_step_directory_is_one_clear_error(run, capsys):
    assert cli.main(["train", "--resume", str(run / "step-000009")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        f"cannot resume from '{run / 'step-000009'}': it does not exist; "
        "checkpoints of this run: step-000001, step-000002, step-000003"
    ) in err
    for p in run.glob("step-*"):
        (p / "trainer.json").write_text('{"format": 1, "step": "3"}')
    assert cli.main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"nothing intact to resume in '{run}': the checkpoint 'latest' names (step-000003) cannot be resumed" in err
    assert "field 'step': Input should be a valid integer" in err and "start over with --overwrite" in err


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """One real checkpoint with an optimizer state (step 40)."""
    model = audiomoe.compose("tiny-cls")
    opt = torch.optim.AdamW(model.parameters())
    model(audiomoe.AudioBatch(torch.randn(2, 4000), 16000, "cls", targets=[0, 1])).loss.backward()
    opt.step()
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt"), 40, opt, extra={"stage": 0, "world": 1})


@pytest.mark.parametrize(
    "change, field",
    [
        ({"step": -3}, "step"),
        ({"step": 2.7}, "step"),
        ({"step": "40"}, "step"),
        ({"step": True}, "step"),
        ({"step": 7}, "step"),
        ({"format": True}, "format"),
        ({"extra": {"__dict__": [["world", 0]]}}, "extra.world"),
        ({"rng": [1]}, "rng"),
        ({"optimizer": {"__tensor__": "nope"}}, "optimizer"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_malformed_trainer_state_is_a_clear_error_naming_the_file_and_the_field(saved, tmp_path, change, field):
    ckpt = tmp_path / "step-000040"
    shutil.copytree(saved, ckpt)
    meta = json.loads((ckpt / "trainer.json").read_text())
    (ckpt / "trainer.json").write_text(json.dumps({**meta, **change}))
    expected = f"'{ckpt / 'trainer.json'}' is not a valid trainer state: field '{field}'"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_trainer_state(ckpt)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_ENCODED = (
    _JSON
    | st.fixed_dictionaries({"__dict__": st.lists(st.lists(_JSON, min_size=0, max_size=3), max_size=3)})
    | st.fixed_dictionaries({"__tensor__": _JSON | st.sampled_from(["optimizer.state.0.exp_avg", "rng.torch"])})
)
_FIELDS = st.sampled_from(["format", "step", "optimizer", "rng", "extra", "other"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(_FIELDS, _ENCODED, max_size=3),
    drop=st.lists(_FIELDS, max_size=2),
    raw=st.none() | st.binary(max_size=40),
)
def test_random_malformed_trainer_states_give_a_valid_state_or_a_clean_error_naming_the_file(saved, changes, drop, raw):
    meta_path = saved / "trainer.json"
    original = meta_path.read_bytes()
    try:
        meta = {k: v for k, v in {**json.loads(original), **changes}.items() if k not in drop}
        meta_path.write_bytes(raw if raw is not None else json.dumps(meta).encode())
        optimizer = torch.optim.AdamW(audiomoe.compose("tiny-cls").parameters())
        try:
            state = load_trainer_state(saved, optimizer)
        except audiomoe.AudioMoEError as exc:
            event("refused")
            assert str(meta_path) in str(exc) or str(saved) in str(exc), str(exc)
        else:
            event("valid")
            assert type(state["step"]) is int and state["step"] == 40 and isinstance(state["extra"], dict)
    finally:
        meta_path.write_bytes(original)
