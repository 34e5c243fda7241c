"""Errors raised by audiomoe. Every message names what was wrong and what to do about it.

This module imports nothing heavy: the registry and the CLI raise these before torch is loaded.
"""

from __future__ import annotations

import difflib
import reprlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .limits import MAX_QUOTED_VALUE


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


def short_repr(value: Any, limit: int = MAX_QUOTED_VALUE) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages quote user values, which may be huge."""
    r = reprlib.Repr()  # keyword arguments to Repr() need Python 3.12
    r.maxlevel, r.maxstring, r.maxother = 3, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AudioMoEError(Exception):
    """Base class of every error audiomoe raises on purpose."""


class MissingPretrainedError(AudioMoEError):
    """Pretrained weights named in a spec are neither a local directory nor in the local HF cache."""


class UnknownComponentError(AudioMoEError, KeyError):
    """A component name that no loaded plugin registered."""

    def __init__(self, kind: str, name: str, available: Sequence[str], failed_plugins: Sequence[str] = ()):
        self.kind, self.name, self.available = kind, name, list(available)
        msg = f"unknown {kind} '{name}'.{did_you_mean(name, available)}"
        msg += " Available: " + (", ".join(sorted(available)) if available else "(none)") + "."
        if failed_plugins:
            msg += " Plugins that failed to load (run `audiomoe plugins`): " + ", ".join(failed_plugins) + "."
        if kind == "kind":  # a typo is not a new kind: kinds are declared by plugins
            msg += " A plugin adds a kind with the audiomoe_register_kinds hook."
        else:
            msg += " A plugin must be installed in this Python environment to be found."
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message

    @classmethod
    def plugin_missing(cls, kind: str, name: str, plugin: str, state: str) -> "UnknownComponentError":
        """``plugin:name`` where that plugin is not loaded here (``state``: not installed, disabled, failed, empty)."""
        exc = cls(kind, name, [])
        exc.message = (f"{kind} '{name}' comes from plugin '{plugin}', which is {state} here (see `audiomoe plugins`); "
                       "install the package that provides it, or name another component")
        return exc


class AmbiguousComponentError(AudioMoEError, KeyError):
    """A component name that two or more plugins registered; it must be qualified as ``plugin:name``."""

    def __init__(self, kind: str, name: str, providers: Sequence[str], versions: Sequence[str] = ()):
        # ``providers`` are plugin names only: each suggestion must work when pasted back.
        self.kind, self.name, self.providers = kind, name, list(providers)
        labels = [f"{p} {v}".strip() for p, v in zip(self.providers, list(versions) + [""] * len(self.providers))]
        choices = " or ".join(f"'{p}:{name}'" for p in self.providers)
        self.message = (
            f"{kind} '{name}' is registered by more than one plugin: "
            + ", ".join(labels)
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
            return f"{where} = {short_repr(self.value)}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(AudioMoEError, ValueError):
    """Every problem found in a model spec, reported at once, each with its dotted key."""

    def __init__(self, problems: Sequence[ConfigProblem], source: str = "config"):
        self.problems = list(problems)
        n = len(self.problems)
        if n == 1:  # one problem reads best on one line (what a CLI user sees)
            super().__init__(f"{source}: {self.problems[0]}")
            return
        head = f"{source} has {n} problems:"
        super().__init__("\n".join([head] + [f"  - {p}" for p in self.problems]))
