"""Issue 24, inputs: every value read from disk or the command line is validated, every problem named.

CSV cases run through the real CLI on real files; plugins are real distributions (``install_dist``);
the property-based tests feed random malformed manifest lines and CSV rows through the real readers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import audiomoe
from audiomoe import cli
from audiomoe.core.errors import AudioMoEError
from audiomoe.data import manifest_from_csv, read_manifest


def _wavs(root: Path, n: int = 2) -> None:
    (root / "wav").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(root / "wav" / f"{i}.wav", np.zeros(1600, np.float32), 16000)


def _main_error(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def _from_csv(capsys, tmp_path: Path, data: bytes) -> str:
    (tmp_path / "in.csv").write_bytes(data)
    return _main_error(
        capsys, "data", "from-csv", str(tmp_path / "in.csv"), str(tmp_path / "out.jsonl"), "--task", "cls"
    )


# -- CSV import ---------------------------------------------------------------------------------------------------


def test_a_csv_with_an_excel_bom_imports(tmp_path, capsys):
    _wavs(tmp_path)
    (tmp_path / "in.csv").write_bytes("\ufefffile,label\nwav/0.wav,dog\nwav/1.wav,cat\n".encode("utf-8"))
    assert cli.main(["data", "from-csv", str(tmp_path / "in.csv"), str(tmp_path / "out.jsonl"), "--task", "cls"]) == 0
    items, _ = read_manifest(tmp_path / "out.jsonl")
    assert [it.target for it in items] == ["dog", "cat"]


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"file,label\nwav/0.wav,dog\nwav/1.wav,caf\xe9\n", "in.csv:3: not UTF-8 (byte 0xe9 at column 14"),
        (b"file,label,offset\nwav/0.wav,dog,abc\n", "in.csv:2: 'offset' must be a number of seconds >= 0, got 'abc'"),
        (
            b"file,label,duration\nwav/0.wav,dog,0.1\nwav/1.wav,cat,-0.5\n",
            "in.csv:3: 'duration' must be a number of seconds >= 0, got '-0.5'",
        ),
        (b"file,label,offset\nwav/0.wav,dog,0.5\n", "in.csv:2: offset 0.5 s is at or past the end of"),
        (b"file,label\nwav/0.wav,dog,extra\n", "in.csv:2: 3 cells for 2 columns"),
        (b"file,label,label\nwav/0.wav,dog,cat\n", "in.csv:1: column(s) ['label'] appear more than once"),
        (b'file,label\nwav/0.wav,"dog\nwav/1.wav,cat\n', "in.csv:2: not a readable CSV row (unexpected end of data)"),
    ],
    ids=[
        "latin-1",
        "offset-text",
        "negative-duration",
        "offset-past-end",
        "extra-cell",
        "duplicate-column",
        "open-quote",
    ],
)
def test_csv_problems_name_the_file_and_line(tmp_path, capsys, data, expected):
    _wavs(tmp_path)
    err = _from_csv(capsys, tmp_path, data)
    assert err.startswith("audiomoe data: error: ") and expected in err, err
    assert not (tmp_path / "out.jsonl").exists()  # refused at import, not written and refused later


# -- manifests and datasets ---------------------------------------------------------------------------------------


def test_a_manifest_line_that_is_not_utf8_is_named(tmp_path):
    _wavs(tmp_path)
    p = tmp_path / "m.jsonl"
    p.write_bytes(
        b'{"audio": "wav/0.wav", "task": "cls", "target": "a"}\n'
        b'{"audio": "wav/1.wav", "task": "cls", "target": "caf\xe9"}\n'
    )
    with pytest.raises(AudioMoEError, match=r"m\.jsonl:2: not UTF-8 \(byte 0xe9 at column 53"):
        read_manifest(p)
    items, bad = read_manifest(p, skip_bad=True)
    assert len(items) == 1 and "m.jsonl:2: not UTF-8" in bad[0]


def test_a_manifest_line_with_a_duplicate_key_is_named(tmp_path):
    _wavs(tmp_path)
    p = tmp_path / "m.jsonl"
    p.write_text('{"audio": "wav/0.wav", "task": "cls", "target": "a", "meta": {"x": 1, "x": 2}}\n')
    with pytest.raises(AudioMoEError, match=r"m\.jsonl:1: key 'x' appears twice in one object"):
        read_manifest(p)
    p.write_text('{"audio": "wav/0.wav", "task": "cls", "target": "a", "target": "b"}\n')
    with pytest.raises(AudioMoEError, match=r"m\.jsonl:1: key 'target' appears twice"):
        read_manifest(p)


def test_a_local_hf_dataset_with_a_corrupt_info_file_names_the_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    from audiomoe.data import build_loader

    _wavs(tmp_path)
    ds = datasets.Dataset.from_dict({"audio": [str(tmp_path / "wav" / "0.wav")], "label": ["dog"]})
    ds.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "hf"))
    info = tmp_path / "hf" / "dataset_info.json"
    info.write_text(info.read_text()[:-20])
    with pytest.raises(AudioMoEError, match=r"dataset_info\.json: corrupt dataset file .*save the dataset again"):
        build_loader({"num_workers": 0, "sources": {"s": {"type": "hf", "path": str(tmp_path / "hf"), "task": "cls"}}})


# -- command-line numbers and splits ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["eval", "run", "--batch-size", "0"], "argument --batch-size: must be an integer in [1, 4096], got '0'"),
        (["eval", "run", "--max-items", "-1"], "argument --max-items: must be an integer >= 1, got '-1'"),
        (["bench", "moe", "tiny-moe-cls", "--reps", "0"], "argument --reps: must be an integer in [1, 1000], got '0'"),
        (
            ["bench", "moe", "tiny-moe-cls", "--tokens", "0"],
            "argument --tokens: must be an integer in [1, 16777216], got '0'",
        ),
        (["train", "tiny-cls", "--nproc", "0"], "argument --nproc: must be an integer in [1, 4096], got '0'"),
        (["train", "tiny-cls", "--workers", "-1"], "argument --workers: must be an integer in [0, 256], got '-1'"),
        (["data", "make", "d", "--workers", "0"], "argument --workers: must be an integer in [1, 256], got '0'"),
        (["ablate", "tiny-cls", "--timeout", "nan"], "argument --timeout: must be a finite number > 0, got 'nan'"),
        (["report", "d", "--batches", "0"], "argument --batches: must be an integer in [1, 1000], got '0'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_numeric_flags_have_declared_ranges(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def test_workers_applies_to_a_preset_run(tmp_path, capsys):
    assert cli.main(["train", "tiny-cls", "--steps", "1", "--workers", "0", "--eval-batches", "1", "--quiet"]) == 0
    from audiomoe.train import TrainConfig

    assert TrainConfig(workers=0).workers == 0 and "workers (-1)" in " ".join(TrainConfig(workers=-1).problems())


def test_eval_split_the_data_does_not_have_names_its_splits(tmp_path, capsys):
    from audiomoe.train import save_checkpoint

    _wavs(tmp_path)
    save_checkpoint(audiomoe.compose("tiny-cls"), tmp_path / "run", 1)
    m = tmp_path / "m.jsonl"
    m.write_text(
        "".join(
            json.dumps({"audio": f"wav/{i}.wav", "task": "cls", "target": "0", "split": s}) + "\n"
            for i, s in enumerate(["train", "dev"])
        )
    )
    err = _main_error(capsys, "eval", str(tmp_path / "run"), "--data", str(m), "--split", "test")
    assert "no line has that split; its lines' splits: 'dev' (1), 'train' (1)" in err and "--split NAME" in err


# -- plugins ------------------------------------------------------------------------------------------------------

CRASHY = '''
import audiomoe
from audiomoe.routers.scored import ScoredRouter


class Crashy(ScoredRouter):
    """A router whose constructor fails the way a plugin's does (a missing kernel)."""

    def __init__(self, params, **kw):
        raise RuntimeError("fused kernel not built for this GPU")


@audiomoe.hookimpl
def audiomoe_register_components(register):
    register("router", "crashy", "crashy_plugin:Crashy", "a router that cannot be built")
'''

MANY = """
import audiomoe


@audiomoe.hookimpl
def audiomoe_register_components(register):
    for i in range(20_000):
        register("router", f"gate_{i:05d}", "audiomoe.routers.scored:ScoredRouter", "one of many")
"""


def _moe() -> str:
    params = audiomoe.compose("tiny-moe-cls").spec["backbone"]["params"]
    return "backbone.moe" if "moe" in params else "backbone"


def test_a_plugin_constructor_error_names_component_plugin_and_message(install_dist, capsys, monkeypatch):
    install_dist("crashy-plugin", "0.2.0", {"crashy": "crashy_plugin"}, {"crashy_plugin": CRASHY})
    monkeypatch.delenv("AUDIOMOE_DEBUG", raising=False)
    moe = _moe()
    assert cli.main(["validate", "tiny-moe-cls", "--set", f"{moe}.router=crashy"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unexpected error" not in err, err
    assert (
        f"router 'crashy' (crashy 0.2.0) at '{moe}.router' failed while being built: "
        "RuntimeError: fused kernel not built for this GPU"
    ) in err
    assert "of plugin 'crashy': report it to its authors" in err
    monkeypatch.setenv("AUDIOMOE_DEBUG", "1")  # the traceback on request, as for any unexpected error
    with pytest.raises(AudioMoEError) as exc:
        cli.main(["validate", "tiny-moe-cls", "--set", f"{moe}.router=crashy"])
    assert isinstance(exc.value.__cause__, RuntimeError)


def test_an_unknown_name_among_20000_lists_a_few_close_matches(install_dist, capsys):
    install_dist("many-plugin", "1.0.0", {"many": "many_plugin"}, {"many_plugin": MANY})
    t0 = time.perf_counter()
    err = _main_error(capsys, "validate", "tiny-moe-cls", "--set", f"{_moe()}.router=gate_0123x")
    assert time.perf_counter() - t0 < 30
    assert len(err) < 1000, len(err)
    assert "Did you mean one of 'gate_00123', 'gate_01023', 'gate_01123'?" in err  # at most three close matches
    assert "20,0" in err and "names are available: `audiomoe list router` lists them all" in err
    with pytest.raises(AudioMoEError) as exc:
        audiomoe.get_registry().get_component("router", "nope")
    assert len(str(exc.value)) < 1000 and "20,0" in str(exc.value)


# -- property-based: random malformed lines and rows through the real readers -------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
_KEYS = st.sampled_from(
    ["audio", "task", "target", "offset", "duration", "prompt", "dataset", "split", "meta", "aduio"]
)
_VALUES = st.one_of(
    _JSON,
    st.sampled_from(["wav/0.wav", "wav/1.wav", "wav", "wav/../wav/0.wav", "cls", "test", "a\x00b"]),
    st.floats(-5, 5),
)
_LINE = st.one_of(
    st.dictionaries(_KEYS, _VALUES, max_size=9).map(json.dumps),
    st.dictionaries(_KEYS, _VALUES, max_size=9)
    .map(json.dumps)
    .map(lambda s: s.replace('"task"', '"task": 1, "task"', 1)),  # a duplicate key
    _JSON.map(json.dumps),
    st.text(max_size=40),
).map(lambda s: s.encode("utf-8").replace(b"\n", b" "))
_LINE_BYTES = st.one_of(_LINE, st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")))


def _assert_names_file_and_line(exc: AudioMoEError, path: Path) -> None:
    text = str(exc)
    assert str(path) in text, text
    if "no usable items" not in text and "has no items" not in text:  # a whole-file verdict has no one line
        assert any(f"{path}:{n}" in text for n in range(1, 20)), text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(_LINE_BYTES, min_size=1, max_size=6),
    skip_bad=st.booleans(),
    split=st.sampled_from([None, "train", "test"]),
    only=st.sampled_from([None, ["cls"]]),
)
def test_random_manifest_lines_give_items_or_a_named_error(lines, skip_bad, split, only):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        _wavs(root)
        path = root / "m.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            items, bad = read_manifest(path, skip_bad=skip_bad, split=split, only_tasks=only)
        except AudioMoEError as exc:
            _assert_names_file_and_line(exc, path)
            return
        for it in items:
            assert isinstance(it.task, str) and it.duration > 0 and np.isfinite(it.duration) and it.offset >= 0
        for problem in bad:
            assert str(path) in problem


_CELL = st.one_of(
    st.sampled_from(["wav/0.wav", "wav/1.wav", "wav", "0.1", "-1", "1e999", "nan", "abc", "", "x,y", '"q"']),
    st.text(max_size=8),
)
_COLUMNS = st.lists(st.sampled_from(["offset", "duration", "split", "prompt", "dataset", "extra", "label"]), max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    extra=_COLUMNS,
    rows=st.lists(st.lists(_CELL, min_size=1, max_size=6), max_size=4),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1"]),
)
def test_random_csv_rows_give_a_valid_manifest_or_a_named_error(extra, rows, encoding):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        _wavs(root)
        header = ["file", "label", *extra]
        text = ",".join(header) + "\n" + "".join(",".join(r) + "\n" for r in rows)
        csv_path = root / "in.csv"
        csv_path.write_bytes(text.encode(encoding, errors="replace"))
        try:
            out = manifest_from_csv(csv_path, root / "out.jsonl", task="cls")
        except AudioMoEError as exc:
            assert str(csv_path) in str(exc), str(exc)
            return
        items, bad = read_manifest(out)  # what was written reads back, every line valid
        assert bad == [] and all(it.duration > 0 for it in items)


def test_the_cli_script_reports_a_bad_csv_in_one_line(tmp_path):
    """The installed entry point, in a subprocess: no traceback for a bad CSV."""
    (tmp_path / "in.csv").write_bytes(b"file,label\nx.wav,caf\xe9\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "audiomoe",
            "data",
            "from-csv",
            str(tmp_path / "in.csv"),
            str(tmp_path / "o.jsonl"),
            "--task",
            "cls",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "in.csv:2: not UTF-8" in r.stderr, r.stderr
