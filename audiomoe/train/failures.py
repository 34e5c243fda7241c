"""How a run started by ``audiomoe train --nproc N`` reports a failure: once, in one line (no torch imported here).

Each rank started by :func:`audiomoe.train.distributed.launch` finds a folder in ``FAILURE_DIR_ENV``; a
failing rank writes its exit code and the line ``audiomoe`` would print into it (:func:`write_failure`)
instead of printing it, torchrun's agent writes how each rank ended (:func:`write_agent_report`), and the
launcher prints the line of the rank that failed for its own reason (:func:`failure_report`).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

#: set by the launcher for its ranks: the folder where a failing rank writes its error line instead of printing it
FAILURE_DIR_ENV = "AUDIOMOE_LAUNCH_FAILURES"
_AGENT_FILE = "agent.json"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)  # whole or absent: the launcher may read it any moment after


def write_failure(code: int, line: str) -> bool:
    """In a rank started by ``train --nproc``: hand the launcher this rank's error line (True); else False."""
    folder = os.environ.get(FAILURE_DIR_ENV)
    if not folder or "RANK" not in os.environ or not os.path.isdir(folder):
        return False
    rank = int(os.environ["RANK"])
    _write_json(Path(folder) / f"rank-{rank}.json", {"rank": rank, "code": code, "line": line, "time": time.time()})
    return True


def _first_cause(records: list[dict]) -> dict:
    """The record that says why the run failed.

    A configuration error outranks Ctrl-C, which outranks an unexpected error (a rank whose peer left
    fails with a connection error after the peer's own error); within the first two rank 0's comes first
    (the others only say that rank 0 failed; it names the last checkpoint), else the earliest written.
    """

    def order(r: dict) -> tuple:
        kind = {2: 0, 130: 1}.get(int(r["code"]), 2)
        return kind, kind < 2 and r["rank"] != 0, r["time"], r["rank"]

    return min(records, key=order)


def failure_report(folder: Path, command: str, agent_code: int) -> tuple[int, str]:
    """``(exit code, line)`` of a launch that failed, from the ranks' records in ``folder`` (see the module doc)."""
    records = []
    for f in sorted(folder.glob("rank-*.json")):
        try:
            records.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    if records:
        rec = _first_cause(records)
        return int(rec["code"]), str(rec["line"])
    try:
        agent = json.loads((folder / _AGENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        agent = {}
    if agent_code == 130 or agent.get("interrupted"):
        return 130, f"audiomoe {command}: interrupted"
    if agent.get("error"):
        return 1, f"audiomoe {command}: unexpected error: torchrun's launcher failed: {agent['error']}"
    ended = agent.get("failures") or {}
    ranks = sorted(ended.items(), key=lambda kv: int(kv[0]))
    how = ", ".join(f"rank {r} {_ending(c)}" for r, c in ranks) or f"exit code {agent_code}"
    return 1, (
        f"audiomoe {command}: unexpected error: a process ended without a message ({how}): killed for memory? "
        f"see the lines above, and please report it"
    )


def _ending(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def write_agent_report(report: dict) -> None:
    """In torchrun's agent started by the launcher: how the ranks ended (``failures``: rank -> exit code), or
    ``interrupted``, or the agent's own ``error``."""
    folder = os.environ.get(FAILURE_DIR_ENV)
    if folder and os.path.isdir(folder):
        _write_json(Path(folder) / _AGENT_FILE, report)
