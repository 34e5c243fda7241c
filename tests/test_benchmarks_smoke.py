"""Every benchmark script declares ``--smoke`` (CI runs each one with it; a new benchmark without it fails here).

The benchmarks themselves are not run here (CI runs ``python3 "$b" --smoke`` for each); this only asks each
script's own argparse for its ``--help``, all scripts in one subprocess so that torch and audiomoe load once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# Runs each script as __main__ with ``--help``: argparse prints the help and exits 0 before any work starts.
_HELP_ALL = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    out = {}
    for path in sys.argv[1:]:
        sys.argv = [path, "--help"]
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                runpy.run_path(path, run_name="__main__")
            code = "returned without exiting"
        except SystemExit as exc:
            code = exc.code
        except Exception as exc:  # a script that cannot even parse its arguments
            code = f"{type(exc).__name__}: {exc}"
        out[path] = {"code": code, "help": buf.getvalue()}
    print(json.dumps(out))
    """
)


def help_texts(scripts: list[Path]) -> dict[str, dict]:
    """``{script path: {"code": exit code, "help": --help output}}`` from one fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", _HELP_ALL, *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCHMARKS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def declares_smoke(help_text: str) -> bool:
    """Whether an argparse help text lists a ``--smoke`` option (its own token, not a prefix of another)."""
    return any(tok.strip("[],") == "--smoke" for tok in help_text.split())


def test_every_benchmark_declares_smoke():
    scripts = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))
    assert len(scripts) >= 7, f"expected the benchmark scripts in {BENCHMARKS}, found {[p.name for p in scripts]}"
    results = help_texts(scripts)
    failed = {Path(p).name: r["code"] for p, r in results.items() if r["code"] != 0}
    assert not failed, f"--help did not exit 0: {failed}"
    missing = [Path(p).name for p, r in results.items() if not declares_smoke(r["help"])]
    assert not missing, f"benchmarks without --smoke (CI runs each with it; see _common.add_mode_flags): {missing}"


def test_declares_smoke_reads_only_the_option():
    assert declares_smoke("usage: x.py [-h] [--quick | --smoke] [--json FILE]")
    assert not declares_smoke("usage: x.py [-h] [--quick] [--smoke-test]\n  --no-smoke  do not")
