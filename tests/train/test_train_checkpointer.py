"""The Checkpointer on its own (one process): when it writes, what a checkpoint's ``extra`` holds, and what a
resumed run gets back from it (the saved run state, the RNG, the data position, the optimizer)."""

from __future__ import annotations

import pytest
import torch

from audiomoe.train.checkpoint import list_checkpoints, load_trainer_state
from audiomoe.train.checkpointer import Checkpointer
from audiomoe.train.distributed import Dist
from audiomoe.train.layout import Layout
from audiomoe.train.recipe import CheckpointSpec
from audiomoe.train.rundir import open_run_dir


class _Data:
    """A batch reader whose position is a state dict, as the trainer's loader's is."""

    def __init__(self) -> None:
        self.pos = {"epoch": 0, "batch": 0, "seed": 7}

    def state_dict(self) -> dict[str, int]:
        return dict(self.pos)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = dict(state)


def _open(root, model, resume=False, every=0, keep=2):
    run = open_run_dir(root, resume=resume)
    dist = Dist()
    chosen = Checkpointer.choose(dist, run, root, None, resume)
    return run, Checkpointer(dist, run, root, chosen, model, Layout(), CheckpointSpec(every=every, keep=keep))


def _step(model, opt):
    opt.zero_grad()
    model(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()


def test_writes_when_due_keeps_the_newest_and_resumes_the_saved_run_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = _Data()
    run, ckpt = _open(tmp_path / "run", model, every=3, keep=2)
    assert ckpt.resumed is None and ckpt.start == 0 and not ckpt.resumes_within(0) and not ckpt.trained_past(0)
    ckpt.attach(1, "joint", opt, data)
    ckpt.state.fed.update({"speaker", "emotion"})
    for step in range(1, 8):
        _step(model, opt)
        data.pos["batch"] = step
        ckpt.state.skipped = step // 4
        ckpt.maybe_save(step, step, final=step == 7, evaluated=step == 5)
    # every 3 steps (3, 6), after an evaluation (5) and at the stage's end (7); two kept
    assert [n for n, _ in list_checkpoints(tmp_path / "run")] == [6, 7]
    assert ckpt.state.checkpoint == tmp_path / "run" / "step-000007" == ckpt.last_good()
    extra = load_trainer_state(tmp_path / "run")["extra"]
    assert (extra["stage"], extra["stage_name"], extra["stage_step"], extra["world"]) == (1, "joint", 7, 1)
    assert extra["tasks_seen"] == ["emotion", "speaker"] and extra["skipped_steps"] == 1
    assert extra["data"] == {"epoch": 0, "batch": 7, "seed": 7} and extra["data_ranks"].tolist() == [[0, 7, 7]]
    rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    run.close()

    torch.manual_seed(123)  # moved on: the resume must put the checkpoint's RNG back
    run, again = _open(tmp_path / "run", model, resume=True)
    assert again.start == 7 and again.state.start == again.state.step == 7
    assert again.state.fed == {"emotion", "speaker"} and again.state.skipped == 1
    assert again.state.checkpoint == tmp_path / "run" / "step-000007"
    assert again.resumes_within(6) and not again.resumes_within(7) and again.trained_past(0)
    again.restore_rng(seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    fresh = _Data()
    again.restore_data(fresh)
    assert fresh.pos == {"epoch": 0, "batch": 7, "seed": 7}
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    again.load_optimizer(opt2)
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(opt2.state_dict()["state"][0][k]), torch.as_tensor(v))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    run.close()


def test_without_a_run_directory_nothing_is_written_and_saving_needs_a_stage(tmp_path):
    model = torch.nn.Linear(3, 2)
    ckpt = Checkpointer(Dist(), None, None, None, model, Layout(), CheckpointSpec(every=1))
    ckpt.maybe_save(1, 1, final=True, evaluated=True)  # no --out: never due
    assert ckpt.state.checkpoint is None and ckpt.last_good() is None
    run, ckpt = _open(tmp_path / "run", model)
    with pytest.raises(AssertionError, match="attach"):
        ckpt.save(1, 1)
    run.close()
