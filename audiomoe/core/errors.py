"""Errors raised by audiomoe. Every message names what was wrong and what to do about it.

This module imports nothing heavy: the registry and the CLI raise these before torch is loaded.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ``" Did you mean 'x'?"`` suffix for ``word`` among ``choices``, or ``""``."""
    word = str(word)
    scored = sorted(
        ((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in set(choices)), key=lambda t: (-t[0], t[1])
    )
    if not scored or scored[0][0] < 0.5:
        return ""
    # Offer runners-up only when they are about as close as the best match.
    close = [c for r, c in scored[:n] if r >= scored[0][0] - 0.04]
    if len(close) == 1:
        return f" Did you mean '{close[0]}'?"
    return " Did you mean one of " + ", ".join(f"'{c}'" for c in close) + "?"


class AudioMoEError(Exception):
    """Base class of every error audiomoe raises on purpose."""


class UnknownComponentError(AudioMoEError, KeyError):
    """A component name that no loaded plugin registered."""

    def __init__(self, kind: str, name: str, available: Sequence[str], failed_plugins: Sequence[str] = ()):
        self.kind, self.name, self.available = kind, name, list(available)
        msg = f"unknown {kind} '{name}'.{did_you_mean(name, available)}"
        msg += " Available: " + (", ".join(sorted(available)) if available else "(none)") + "."
        if failed_plugins:
            msg += " Plugins that failed to load (run `audiomoe plugins`): " + ", ".join(failed_plugins) + "."
        msg += " A plugin must be installed in this Python environment to be found."
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class AmbiguousComponentError(AudioMoEError, KeyError):
    """A component name that two or more plugins registered; it must be qualified as ``plugin:name``."""

    def __init__(self, kind: str, name: str, providers: Sequence[str]):
        self.kind, self.name, self.providers = kind, name, list(providers)
        choices = " or ".join(f"'{p}:{name}'" for p in providers)
        self.message = (
            f"{kind} '{name}' is registered by more than one plugin: "
            + ", ".join(providers)
            + f". Pick one by qualifying the name: {choices}."
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class PluginLoadError(AudioMoEError):
    """A plugin could not be imported or registered (raised only in strict mode)."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a configuration: where (dotted key), what was given, and what is wrong."""

    key: str
    message: str
    value: Any = None
    has_value: bool = False

    def __str__(self) -> str:
        where = self.key or "<root>"
        if self.has_value:
            return f"{where} = {self.value!r}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(AudioMoEError, ValueError):
    """Every problem found in a model spec, reported at once, each with its dotted key."""

    def __init__(self, problems: Sequence[ConfigProblem], source: str = "config"):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{source} has {n} problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))
