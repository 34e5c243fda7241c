"""Issue 11, bad input fails fast with a clear error; issue 10, what `audiomoe train` tells its user."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import audiomoe
from audiomoe import cli
from audiomoe.encoders.features import resample_ratio
from audiomoe.train import TrainConfig, train
from audiomoe.train.progress import Progress

_HERE = Path(sys.executable).parent / "audiomoe"
EXE = [str(_HERE)] if _HERE.exists() else [sys.executable, "-m", "audiomoe.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model():
    m = audiomoe.compose("tiny-cls")
    m.eval()
    return m


def _run(model, waveforms, sample_rate=16000):
    return model(audiomoe.AudioBatch(waveforms, sample_rate, "cls"))


@pytest.mark.parametrize(
    "rate, match",
    [
        (0, r"sample_rate 0 Hz is outside \[1000, 768000\]; give the clip's real rate in Hz"),
        (-16000, r"sample_rate -16000 Hz is outside"),
        (16000.5, r"sample_rate must be a whole number of Hz \(e.g. 16000\), got 16000.5"),
        ("16000", r"sample_rate must be a whole number of Hz \(e.g. 16000\), got '16000'"),
        (True, r"got True"),
        (10**12, r"sample_rate 1000000000000 Hz is outside"),
    ],
)
def test_bad_sample_rates_are_named(model, rate, match):
    with pytest.raises(audiomoe.AudioMoEError, match=match):
        _run(model, torch.randn(1, 4000), rate)


def test_a_whole_float_rate_is_the_same_as_the_int(model):
    x = torch.randn(1, 4000)
    assert torch.equal(_run(model, x, 16000.0).outputs["cls"], _run(model, x, 16000).outputs["cls"])


def test_waveforms_as_a_python_list_say_how_to_convert(model):
    with pytest.raises(
        audiomoe.AudioMoEError, match=r"got list; convert it first, e.g. torch.tensor\(samples, dtype=torch.float32\)"
    ):
        _run(model, [[0.0] * 4000])


def test_a_clip_shorter_than_the_receptive_field_names_the_minimum(model):
    x = torch.randn(3, 4000)
    with pytest.raises(
        audiomoe.AudioMoEError,
        match=r"item\(s\) \[1\] have \[100\] samples, .* needs at least 160 samples \(10.0 ms at 16000 Hz\); pad",
    ):
        model(audiomoe.AudioBatch(x, 16000, "cls", lengths=torch.tensor([4000, 100, 4000])))
    _run(model, torch.randn(1, 160))  # the named minimum works


def test_stereo_in_the_wrong_layout_is_refused_and_the_right_one_down_mixed(model):
    stereo = torch.randn(2, 2, 4000)
    with pytest.raises(
        audiomoe.AudioMoEError,
        match=r"shape \(2, 4000, 2\) look like \[batch, samples, channels\]; .*transpose\(1, 2\)",
    ):
        _run(model, stereo.transpose(1, 2))
    with pytest.raises(audiomoe.AudioMoEError, match=r"shape \(4000, 2\) look like \[samples, channels\] of one clip"):
        _run(model, stereo[0].T)
    assert torch.allclose(_run(model, stereo).outputs["cls"], _run(model, stereo.mean(1)).outputs["cls"], atol=1e-6)


def test_odd_sample_rates_resample_through_a_close_ratio_fast(model):
    assert resample_ratio(48000, 16000) == (3, 1) and resample_ratio(44100, 16000) == (441, 160)
    orig, new = resample_ratio(48001, 16000)
    assert (orig, new) == (3, 1) and abs((new / orig) / (16000 / 48001) - 1) < 1e-3
    t0 = time.monotonic()
    _run(model, torch.randn(1, 48001), 48001)  # was a 3 GB resampling kernel
    assert time.monotonic() - t0 < 5
    with pytest.raises(
        audiomoe.AudioMoEError, match=r"cannot resample 7919 Hz to 16000 Hz: .*resample the audio to a standard rate"
    ):
        _run(model, torch.randn(1, 7919), 7919)


def test_overflowing_samples_are_an_error_naming_the_items(model):
    x = torch.randn(3, 4000) * 0.1
    silent = _run(model, torch.zeros(1, 4000)).outputs["cls"]
    x[1] *= 1e21
    with pytest.raises(
        audiomoe.AudioMoEError,
        match=r"waveform item\(s\) \[1\] are too loud to process .*float audio should lie in \[-1, 1\]",
    ):
        _run(model, x)
    assert not torch.equal(_run(model, x[:1]).outputs["cls"], silent)
    from audiomoe.encoders.features import normalize_waveforms

    with pytest.raises(audiomoe.AudioMoEError, match=r"variance of waveform item\(s\) \[0\] overflows float32"):
        normalize_waveforms(torch.full((1, 100), 3e37), torch.tensor([100]))


def test_train_refuses_heads_the_synthetic_data_cannot_feed(tmp_path):
    out = subprocess.run(
        EXE + ["train", "tiny-tags", "--steps", "1", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    tags = next(iter(audiomoe.compose("tiny-tags").spec["tasks"]))
    assert line.startswith(
        "audiomoe train: error: the built-in synthetic data feeds only single-label classification heads"
    )
    assert f"'{tags}' (classification, multi-label) would never train" in line and f"--set tasks.{tags}=null" in line
    assert not (tmp_path / "r" / "run.json").exists()  # nothing started: a fixed retry needs no --overwrite
    specs = audiomoe.compose("tiny-multitask").spec["tasks"]
    unfed = [n for n, t in specs.items() if t["name"] != "classification" or t["params"].get("multi_label")]
    assert len(unfed) >= 2  # the preset mixes head kinds; every one the data cannot feed is named
    with pytest.raises(audiomoe.AudioMoEError) as exc:
        train("tiny-multitask", (), TrainConfig(steps=1, out_dir=str(tmp_path / "r"), progress=False))
    assert all(f"'{n}' ({specs[n]['name']}" in str(exc.value) for n in unfed)
    fixed = train(
        "tiny-multitask",
        [f"tasks.{n}=null" for n in unfed],
        TrainConfig(steps=1, batch_size=4, eval_batches=0, out_dir=str(tmp_path / "r"), progress=False),
    )
    assert fixed["untrained_heads"] == [] and set(fixed["eval_before"]) == set()


def test_own_data_that_skips_a_head_is_reported(tmp_path):
    from audiomoe.data.synthetic import tone_stream

    stream = tone_stream({"emotion": 4}, 4, 16000)
    with pytest.warns(RuntimeWarning, match=r"never had an item for head\(s\) \['speaker'\]: they did not train"):
        result = train("tiny-moe-cls", (), TrainConfig(steps=2, progress=False), data=stream, eval_data=[])
    assert result["untrained_heads"] == ["speaker"]


def test_off_a_terminal_progress_is_a_line_every_n_steps():
    stream = io.StringIO()
    bar = Progress(total=12, mode="auto", every=4, stream=stream)
    for step in range(1, 13):
        bar.step(step, 1.0 / step)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["4/12", "8/12", "12/12"] and "\r" not in stream.getvalue()
    # the total is the sum of the tasks a batch holds: with two to four present, each is named
    stream = io.StringIO()
    bar = Progress(total=2, mode="lines", every=1, stream=stream)
    bar.step(1, 137.25, {"tts": 68.125, "music": 69.125})
    bar.step(2, 68.5, {"tts": 68.5})
    first, second = stream.getvalue().splitlines()
    assert "loss 137.2500 (tts 68.12, music 69.12)" in first and "loss 68.5000  " in second and "(" not in second
    quiet = io.StringIO()
    bar = Progress(total=12, mode="off", stream=quiet)
    bar.step(12, 0.1)
    bar.note("hello")
    assert quiet.getvalue() == ""


def test_cli_train_logs_lines_and_quiet_prints_nothing(tmp_path, capsys):
    # capsys' stderr is not a terminal, like a log file or CI: lines, not a redrawn bar
    argv = [
        "train",
        "tiny-cls",
        "--steps",
        "6",
        "--log-every",
        "3",
        "--batch-size",
        "2",
        "--eval-batches",
        "1",
        "--eval-every",
        "3",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert [line.split()[1] for line in out.err.splitlines() if line.startswith("step ")] == ["3/6", "6/6"]
    assert "\r" not in out.err and out.out.startswith(
        "trained 6 steps"
    )  # a summary, not a JSON dump (--json prints that)
    assert cli.main(argv[:2] + ["--steps", "2", "--batch-size", "2", "--eval-batches", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert (
        cli.main(
            [
                "train",
                "tiny-cls",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--eval-batches",
                "0",
                "--quiet",
                "--out",
                str(tmp_path / "q"),
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["steps"] == 2


def test_train_help_describes_every_flag_and_the_seed_story():
    parser = cli.build_parser()
    train_parser = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    for action in train_parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    text = train_parser.format_help()
    assert "the spec's `seed` fixes the initial parameters" in text and "--seed fixes what the run draws" in text
    for flag in ("--quiet", "--resume", "--overwrite", "--log-every", "--save-every", "--keep"):
        assert flag in text


def test_seeds_do_what_the_help_says():
    cfg = dict(steps=2, batch_size=2, eval_batches=0, progress=False)
    a = train("tiny-cls", (), TrainConfig(seed=1, **cfg))
    b = train("tiny-cls", (), TrainConfig(seed=1, **cfg))
    c = train("tiny-cls", (), TrainConfig(seed=2, **cfg))
    assert a["final_loss"] == b["final_loss"] != c["final_loss"]  # --seed: the data and the run
    w0 = audiomoe.compose("tiny-cls").state_dict()
    w1 = audiomoe.compose("tiny-cls", ["seed=1"]).state_dict()
    assert not all(torch.equal(w0[k], w1[k]) for k in w0)  # the spec's seed: the initial weights
