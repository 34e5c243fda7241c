"""Paper claims checked against a study's runs, each answered in plain words with its numbers and intervals.

A claim (``claims:`` in a study file) compares a candidate config with reference configs, paired by
seed (:func:`audiomoe.analysis.stats.paired_test`):

- ``better``: *holds* when every candidate - reference interval of the key metric lies above 0,
  *does not hold* when one lies below 0, *not resolved* when an interval contains 0 (these runs
  cannot tell them apart);
- ``cheaper_at_equal_quality``: *holds* when the cost difference (``cost``, e.g. MoE MFLOPs per audio
  second) lies below 0 and the quality difference's low end is above ``-margin``; *does not hold* when
  the candidate costs more (interval above 0) or is worse by more than the margin (interval below
  ``-margin``); otherwise *not resolved*.

A claim whose configs were not run (an arm skipped, every run failed) is *not measured*, with why.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from .stats import PairedTest, paired_test, summarize


def _by_seed(rows: Sequence[Mapping[str, Any]], config: str, key: str) -> dict[Any, Any]:
    return {r["seed"]: r.get(key) for r in rows if r.get("config") == config and r.get("status") == "ok"}


def _fmt(x: Optional[float], d: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:+.{d}f}" if d < 0 else f"{x:.{d}f}"


def _diff_text(t: PairedTest, d: int = 3) -> str:
    if t.n < 2:
        return f"difference {_fmt(t.mean_diff, d)} ({t.n} paired seed{'s' if t.n != 1 else ''}: no interval)"
    p = "n/a" if not math.isfinite(t.p) else f"{t.p:.2g}"
    return f"difference {t.mean_diff:+.{d}f}, 95% CI [{t.ci_low:+.{d}f}, {t.ci_high:+.{d}f}], paired over {t.n} seeds, p = {p}"


def _cfg_text(rows: Sequence[Mapping[str, Any]], config: str, key: str, d: int = 3) -> str:
    return f"{config} {summarize(_by_seed(rows, config, key).values()).text(d)}"


def evaluate_claim(claim: Any, rows: Sequence[Mapping[str, Any]], metric: str, arm_of: Mapping[str, str], skipped: Mapping[str, str]) -> dict[str, Any]:
    """One claim's verdict (``holds`` / ``does not hold`` / ``not resolved`` / ``not measured``), numbers and a plain sentence."""
    names = [claim.candidate, *claim.reference]
    out: dict[str, Any] = {"id": claim.id, "claim": claim.text, "source": claim.source, "candidate": claim.candidate, "reference": list(claim.reference)}
    missing = [n for n in names if not _by_seed(rows, n, metric)]
    if missing:
        why = sorted({skipped[arm_of[n]] for n in missing if arm_of.get(n) in skipped})
        reason = "; ".join(why) if why else f"no finished run of {', '.join(missing)}"
        out.update(verdict="not measured", measured="—", plain=f"Not measured: {reason}.")
        return out
    tests = {ref: paired_test(_by_seed(rows, claim.candidate, metric), _by_seed(rows, ref, metric)) for ref in claim.reference}
    measured = [_cfg_text(rows, n, metric) for n in names]
    parts = [f"{claim.candidate} - {ref}: {_diff_text(t)}" for ref, t in tests.items()]
    if claim.kind == "better":
        if any(t.n < 2 for t in tests.values()):
            verdict = "not resolved"
        elif all(t.ci_low > 0 for t in tests.values()):
            verdict = "holds"
        elif any(t.ci_high < 0 for t in tests.values()):
            verdict = "does not hold"
        else:
            verdict = "not resolved"
        plain = {
            "holds": f"Holds at this scale: {claim.candidate} scores higher {metric} than {' and '.join(claim.reference)}, and the interval(s) exclude no gain.",
            "does not hold": f"Does not hold at this scale: {claim.candidate} scores lower {metric} than a reference, with an interval below 0.",
            "not resolved": f"Not resolved at this scale: an interval contains 0, so these runs cannot tell {claim.candidate} from {' / '.join(claim.reference)} on {metric}.",
        }[verdict]
    else:
        costs = {ref: paired_test(_by_seed(rows, claim.candidate, claim.cost), _by_seed(rows, ref, claim.cost)) for ref in claim.reference}
        measured += [_cfg_text(rows, n, claim.cost, 2) for n in names]
        parts += [f"{claim.cost} {claim.candidate} - {ref}: {_diff_text(t, 2)}" for ref, t in costs.items()]
        m = claim.margin
        if any(t.n < 2 for t in [*tests.values(), *costs.values()]):
            verdict = "not resolved"
        elif all(c.ci_high < 0 for c in costs.values()) and all(t.ci_low > -m for t in tests.values()):
            verdict = "holds"
        elif any(c.ci_low > 0 for c in costs.values()) or any(t.ci_high < -m for t in tests.values()):
            verdict = "does not hold"
        else:
            verdict = "not resolved"
        cheaper = all(c.ci_high < 0 for c in costs.values())
        dearer = any(c.ci_low > 0 for c in costs.values())
        cost_words = "costs less" if cheaper else "costs more" if dearer else "costs about the same (interval contains 0)"
        worse = any(t.ci_high < -m for t in tests.values())
        equal = all(t.ci_low > -m for t in tests.values())
        higher = all(t.ci_low > 0 for t in tests.values())
        q_words = ("scores higher (interval above 0)" if higher else f"is within the ±{m} quality margin" if equal
                   else f"is worse by more than {m}" if worse else f"cannot be shown within the ±{m} quality margin")  # fmt: skip
        plain = f"{verdict.capitalize()} at this scale: {claim.candidate} {cost_words} in {claim.cost} than {' / '.join(claim.reference)} and {q_words} on {metric}."
    for extra in claim.also:
        for ref in claim.reference:
            t = paired_test(_by_seed(rows, claim.candidate, extra), _by_seed(rows, ref, extra))
            parts.append(f"{extra} {claim.candidate} - {ref}: {_diff_text(t)}")
    out.update(verdict=verdict, measured="; ".join(measured), differences="; ".join(parts), plain=plain,
               tests={ref: t.as_dict() for ref, t in tests.items()})  # fmt: skip
    return out


def evaluate_claims(claims: Sequence[Any], rows: Sequence[Mapping[str, Any]], metric: str, arm_of: Mapping[str, str], skipped: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every claim of a study, in file order."""
    return [evaluate_claim(c, rows, metric, arm_of, skipped) for c in claims]
