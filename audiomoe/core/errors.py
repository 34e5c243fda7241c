"""Errors raised by audiomoe. Every message names what was wrong and what to do about it.

This module imports nothing heavy: the registry and the CLI raise these before torch is loaded.
"""

from __future__ import annotations

import difflib
import reprlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from audiomoe.core.limits import MAX_QUOTED_VALUE

#: Most names an error message lists in full; beyond it, the closest few and a count.
MAX_LISTED_NAMES = 40


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ``" Did you mean 'x'?"`` suffix for ``word`` among ``choices``, or ``""``."""
    word = str(word)
    matcher = difflib.SequenceMatcher(None, "", word)  # word as seq2: its analysis is done once, not per choice
    scored = []
    for c in set(choices):
        matcher.set_seq1(c)
        # The cheap upper bounds first (as difflib.get_close_matches does): 20,000 names take milliseconds, not seconds.
        # Below 0.46 a name can be neither the best match (>= 0.5) nor a runner-up within 0.04 of it.
        if matcher.real_quick_ratio() >= 0.46 and matcher.quick_ratio() >= 0.46:
            scored.append((matcher.ratio(), c))
    scored.sort(key=lambda t: (-t[0], t[1]))
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
        if len(self.available) <= MAX_LISTED_NAMES:
            msg += " Available: " + (", ".join(sorted(available)) if available else "(none)") + "."
        else:  # thousands of names make a line nobody reads: the close matches above, the count, where the rest are
            what = {"kind": "'*'", "preset": "preset"}.get(kind, kind)
            msg += f" {len(self.available):,} names are available: `audiomoe list {what}` lists them all."
        if failed_plugins:
            shown = list(failed_plugins)[:MAX_LISTED_NAMES]
            more = f" and {len(failed_plugins) - len(shown)} more" if len(failed_plugins) > len(shown) else ""
            msg += " Plugins that failed to load (run `audiomoe plugins`): " + ", ".join(shown) + more + "."
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
        exc.message = (
            f"{kind} '{name}' comes from plugin '{plugin}', which is {state} here (see `audiomoe plugins`); "
            "install the package that provides it, or name another component"
        )
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


class ComponentError(AudioMoEError):
    """A component's own code failed (not the user's config): names the component, its plugin and where it sits.

    ``exit_code`` is 1, as for any unexpected failure; the original exception is the ``__cause__``.
    """

    exit_code = 1


def constructor_error(kind: str, name: str, plugin: str, version: str, path: str, exc: BaseException) -> AudioMoEError:
    """The error for a component constructor that raised ``exc``: always naming kind, name, plugin and path.

    A ``ValueError`` or ``AssertionError`` is the constructor refusing its params (a config problem);
    anything else is a bug in the component, reported to whoever can fix it.
    """
    where, key = (f"'{path}'", path + ".") if path else ("the top level", "")
    who = f"{kind} '{name}' ({plugin} {version})".replace(" )", ")")
    text = " ".join(str(exc).split())
    text = text if len(text) <= 1000 else text[:997] + "..."  # a message is a line, not a dump
    if isinstance(exc, (ValueError, AssertionError)):
        return AudioMoEError(
            f"{who} at {where} refused its params: {text or type(exc).__name__}; "
            f"change them with --set {key}<param>=..."
        )
    if plugin == "builtin":
        fix = "a bug in audiomoe: set AUDIOMOE_DEBUG=1 for the traceback, and please report it"
    else:
        fix = (
            f"a bug (or a missing requirement) of plugin '{plugin}': report it to its authors with the traceback "
            f"(AUDIOMOE_DEBUG=1 shows it), or use another {kind}"
        )
    return ComponentError(f"{who} at {where} failed while being built: {type(exc).__name__}: {text}. This is {fix}")


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
