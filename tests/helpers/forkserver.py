"""A fork server for kill -9 tests (shared by test_reliability_kill.py and test_train_resume.py; not a test module).

It imports torch and the given modules once, then reads one ``audiomoe`` argv per line from stdin,
forks a child that runs ``cli.main(argv)`` (output silenced), prints the child's pid, then
``status <wait status>`` when it ends. Forking skips the ~2 s import per run, so a test can kill
many real training processes at random moments.
"""

from __future__ import annotations

import textwrap

_LOOP = """
from audiomoe import cli
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os._exit(cli.main(line.split()))
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("status", status, flush=True)
"""


def server_source(preload: str) -> str:
    """The server script; ``preload`` is imported before the loop (no tensor op may run before fork)."""
    return "import os, sys\n" + textwrap.dedent(preload).strip() + "\n" + _LOOP
