"""Paper claims and controls checked against a study's runs, each answered in plain words with its numbers.

A claim (``claims:`` in a study file) compares a candidate config with reference configs, paired by
seed (:func:`audiomoe.analysis.stats.paired_test`; intervals clipped to the metric's range):

- ``better``: *holds* when every candidate - reference interval of the key metric lies above 0;
  *does not hold* when one lies below 0, or when the candidate is shown equivalent to one reference
  (inside ``±margin`` by two one-sided tests, :func:`audiomoe.analysis.stats.equivalence`: no gain
  worth the name over it) but not to all; *equivalent* when every difference is inside ``±margin``; otherwise *not resolved*, with
  the minimum detectable effect of these seeds (:func:`audiomoe.analysis.stats.minimum_detectable_effect`)
  so a reader tells "underpowered" (a large MDE) from "no effect of that size";
- ``cheaper_at_equal_quality``: *holds* when the cost difference (``cost``, e.g. MoE MFLOPs per audio
  second) lies below 0 and the quality difference's low end is above ``-margin``; *does not hold* when
  the candidate costs more (interval above 0) or is worse by more than the margin (interval below
  ``-margin``); otherwise *not resolved*.

A ``better`` claim with ``noninferior`` metrics (e.g. the majority domain's tasks, when the key metric
is the minority's) holds only when each of those differences' interval also lies above ``-margin``;
it does not hold when one lies below ``-margin``; otherwise it is not resolved, and says which.

An entry with ``role: control`` is a *positive control*: a comparison whose effect is known to exist
(e.g. a model against the same model with its audio withheld). It *resolves* when its interval lies
above 0. Until every positive control resolves, the claims are *not interpreted*: a study that cannot
detect a known effect says nothing about the unknown ones. Metrics under ``also`` are exploratory.
A claim whose configs were not run (an arm skipped, every run failed) is *not measured*, with why.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from audiomoe.analysis.stats import (
    PairedTest,
    equivalence,
    metric_range,
    minimum_detectable_effect,
    paired_test,
    summarize,
)


def _by_seed(rows: Sequence[Mapping[str, Any]], config: str, key: str) -> dict[Any, Any]:
    return {r["seed"]: r.get(key) for r in rows if r.get("config") == config and r.get("status") == "ok"}


def _num(x: Optional[float]) -> Optional[float]:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _cfg_text(rows: Sequence[Mapping[str, Any]], config: str, key: str, d: int = 3) -> str:
    return f"{config} {summarize(_by_seed(rows, config, key).values(), bounds=metric_range(key)).text(d)}"


def _test(rows: Sequence[Mapping[str, Any]], cand: str, ref: str, key: str) -> PairedTest:
    return paired_test(_by_seed(rows, cand, key), _by_seed(rows, ref, key), bounds=metric_range(key, difference=True))


def _record(ref: str, t: PairedTest, margin: float) -> dict[str, Any]:
    eq = equivalence(t, margin) if t.n >= 2 else {"p": math.nan, "equivalent": False}
    return {
        "reference": ref,
        "difference": _num(t.mean_diff),
        "interval": None if t.deterministic or t.n < 2 else [t.ci_low, t.ci_high],
        "p": None if t.deterministic else _num(t.p),
        "n": t.n,
        "deterministic": t.deterministic,
        "minimum_detectable_effect": _num(minimum_detectable_effect(t.n, t.std_diff)),
        "equivalence_p": _num(eq["p"]),
        "equivalent": bool(eq["equivalent"]),
    }


def _binding(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The comparison closest to failing (lowest interval end): the one a claim over several references stands on."""

    def low(r: dict[str, Any]) -> float:
        return r["interval"][0] if r["interval"] else (r["difference"] if r["difference"] is not None else -math.inf)

    return min(records, key=low)


def _better_verdict(tests: Mapping[str, PairedTest], records: Sequence[dict[str, Any]]) -> str:
    if any(t.n < 2 for t in tests.values()):
        return "not resolved"
    lows = [t.mean_diff if t.deterministic else t.ci_low for t in tests.values()]
    highs = [t.mean_diff if t.deterministic else t.ci_high for t in tests.values()]
    if all(lo > 0 for lo in lows):
        return "holds"
    if any(hi < 0 for hi in highs):
        return "does not hold"
    if all(r["equivalent"] for r in records):
        return "equivalent"
    if any(r["equivalent"] for r in records):  # no gain beyond the margin over one reference: it does not beat them all
        return "does not hold"
    return "not resolved"


def _plain_better(claim: Any, verdict: str, metric: str, records: Sequence[dict[str, Any]]) -> str:
    refs = " / ".join(claim.reference)
    mdes = [r["minimum_detectable_effect"] for r in records if r["minimum_detectable_effect"] is not None]
    mde = f"; these seeds detect a difference of {max(mdes):.3f} or more (power 0.8)" if mdes else ""
    below = any(r["interval"] and r["interval"][1] < 0 for r in records)
    eq = [] if below else [r["reference"] for r in records if r["equivalent"]]
    return {
        "holds": f"Holds at this scale: {claim.candidate} scores higher {metric} than {' and '.join(claim.reference)}; "
        "every interval lies above 0.",
        "does not hold": (
            f"Does not hold at this scale: {claim.candidate} scores lower {metric} than a reference, with an interval below 0."
            if not eq
            else f"Does not hold at this scale: {claim.candidate} is equivalent to {' and '.join(eq)} within ±{claim.margin} "
            f"on {metric} (two one-sided tests), so it does not beat every reference by a meaningful margin."
        ),
        "equivalent": f"Equivalent at this scale: {claim.candidate} and {refs} differ by less than ±{claim.margin} on {metric} "
        "(two one-sided tests).",
        "not resolved": f"Not resolved at this scale: an interval contains 0 and the difference is not shown to be within "
        f"±{claim.margin}{mde}.",
    }[verdict]


def _cheaper(
    claim: Any, rows: Sequence[Mapping[str, Any]], metric: str, tests: Mapping[str, PairedTest]
) -> tuple[str, str, list[str], list[str]]:
    costs = {ref: _test(rows, claim.candidate, ref, claim.cost) for ref in claim.reference}
    measured = [_cfg_text(rows, n, claim.cost, 2) for n in [claim.candidate, *claim.reference]]
    parts = [f"{claim.cost} {claim.candidate} - {ref}: {t.text(2)}" for ref, t in costs.items()]
    m = claim.margin

    def hi(t: PairedTest) -> float:
        return t.mean_diff if t.deterministic else t.ci_high

    def lo(t: PairedTest) -> float:
        return t.mean_diff if t.deterministic else t.ci_low

    if any(t.n < 2 for t in [*tests.values(), *costs.values()]):
        verdict = "not resolved"
    elif all(hi(c) < 0 for c in costs.values()) and all(lo(t) > -m for t in tests.values()):
        verdict = "holds"
    elif any(lo(c) > 0 for c in costs.values()) or any(hi(t) < -m for t in tests.values()):
        verdict = "does not hold"
    else:
        verdict = "not resolved"
    cheaper, dearer = all(hi(c) < 0 for c in costs.values()), any(lo(c) > 0 for c in costs.values())
    refs = " / ".join(claim.reference)
    cost_words = (
        f"costs less than {refs}"
        if cheaper
        else f"costs more than {refs}"
        if dearer
        else f"costs about the same as {refs} (interval contains 0)"
    )
    if all(lo(t) > 0 for t in tests.values()):
        q_words = "scores higher (interval above 0)"
    elif all(lo(t) > -m for t in tests.values()):
        q_words = f"is within the -{m} quality margin"
    elif any(hi(t) < -m for t in tests.values()):
        q_words = f"is worse by more than {m}"
    else:
        mdes = [minimum_detectable_effect(t.n, t.std_diff) for t in tests.values()]
        finite = [d for d in mdes if math.isfinite(d)]
        power = f" (these seeds detect a difference of {max(finite):.3f} or more, power 0.8)" if finite else ""
        q_words = f"cannot be shown within the -{m} quality margin{power}"
    plain = (
        f"{verdict.capitalize()} at this scale: {claim.candidate} {cost_words} in {claim.cost} "
        f"and {q_words} on {metric}."
    )
    return verdict, plain, measured, parts


def _open_mde(records: Sequence[dict[str, Any]]) -> Optional[float]:
    """The largest MDE among the non-inferiority comparisons not shown either way (None: none has one)."""
    mdes = [
        r["minimum_detectable_effect"] for r in records if r["state"] == "not shown" and r["minimum_detectable_effect"]
    ]
    return max(mdes) if mdes else None


def _noninferior(
    claim: Any, rows: Sequence[Mapping[str, Any]], verdict: str, plain: str
) -> tuple[str, str, list[str], list[dict[str, Any]]]:
    """The key metric's verdict, qualified by the ``noninferior`` metrics (module doc)."""
    m, records, parts = claim.margin, [], []
    for metric in claim.noninferior:
        for ref in claim.reference:
            t = _test(rows, claim.candidate, ref, metric)
            lo = t.mean_diff if t.deterministic else t.ci_low
            hi = t.mean_diff if t.deterministic else t.ci_high
            state = "non-inferior" if lo > -m else "inferior" if hi < -m else "not shown"
            records.append({"metric": metric, "reference": ref, **_record(ref, t, m), "state": state})
            parts.append(f"non-inferiority {metric} {claim.candidate} - {ref}: {t.text()} ({state})")
    worse = [f"{r['metric']} vs {r['reference']}" for r in records if r["state"] == "inferior"]
    open_ = [f"{r['metric']} vs {r['reference']}" for r in records if r["state"] == "not shown"]
    if verdict != "holds" or not (worse or open_):
        if verdict == "holds":
            plain += f" Non-inferior (low end above -{m}) on {', '.join(claim.noninferior)}."
        return verdict, plain, parts, records
    if worse:
        return (
            "does not hold",
            f"Does not hold at this scale: {claim.candidate} is better on {claim.metric or 'the key metric'} but worse by "
            f"more than {m} on {', '.join(worse)}.",
            parts,
            records,
        )
    power = _open_mde(records)
    mde = f"; these seeds detect a difference of {power:.3f} or more there (power 0.8)" if power else ""
    return (
        "not resolved",
        f"Not resolved at this scale: {claim.candidate} is better on {claim.metric or 'the key metric'}, but "
        f"non-inferiority within -{m} is not shown on {', '.join(open_)}{mde}.",
        parts,
        records,
    )


def evaluate_claim(
    claim: Any, rows: Sequence[Mapping[str, Any]], metric: str, arm_of: Mapping[str, str], skipped: Mapping[str, str]
) -> dict[str, Any]:
    """One claim's (or control's) verdict, its numbers (difference, interval, p, minimum detectable effect) and a sentence."""
    names = [claim.candidate, *claim.reference]
    key = getattr(claim, "metric", None) or metric
    role = getattr(claim, "role", "claim")
    out: dict[str, Any] = {
        "id": claim.id,
        "role": role,
        "claim": claim.text,
        "source": claim.source,
        "candidate": claim.candidate,
        "reference": list(claim.reference),
        "arms": sorted({arm_of.get(n, "") for n in names}),
        "metric": key,
        "margin": claim.margin,
        "difference": None,
        "interval": None,
        "p": None,
        "minimum_detectable_effect": None,
    }
    missing = [n for n in names if not _by_seed(rows, n, key)]
    if missing:
        why = sorted({skipped[arm_of[n]] for n in missing if arm_of.get(n) in skipped})
        reason = "; ".join(why) if why else f"no finished run of {', '.join(missing)}"
        out.update(verdict="not measured", measured="—", plain=f"Not measured: {reason}.")
        return out
    tests = {ref: _test(rows, claim.candidate, ref, key) for ref in claim.reference}
    records = [_record(ref, t, claim.margin) for ref, t in tests.items()]
    measured = [_cfg_text(rows, n, key) for n in names]
    parts = [f"{claim.candidate} - {ref}: {t.text()}" for ref, t in tests.items()]
    if claim.kind == "better":
        verdict = _better_verdict(tests, records)
        plain = _plain_better(claim, verdict, key, records)
    else:
        verdict, plain, cost_measured, cost_parts = _cheaper(claim, rows, key, tests)
        measured, parts = measured + cost_measured, parts + cost_parts
    primary = verdict
    if claim.kind == "better" and getattr(claim, "noninferior", None):
        verdict, plain, ni_parts, out["noninferiority"] = _noninferior(claim, rows, verdict, plain)
        parts += ni_parts
    for extra in claim.also:
        for ref in claim.reference:
            parts.append(
                f"exploratory {extra} {claim.candidate} - {ref}: {_test(rows, claim.candidate, ref, extra).text()}"
            )
    bind = _binding(records)
    out.update(
        verdict=verdict,
        measured="; ".join(measured),
        differences="; ".join(parts),
        plain=plain,
        difference=bind["difference"],
        interval=bind["interval"],
        p=bind["p"],
        minimum_detectable_effect=bind["minimum_detectable_effect"],
        comparisons=records,
        tests={ref: t.as_dict() for ref, t in tests.items()},
    )
    if primary == "holds" and verdict == "not resolved" and out.get("noninferiority"):  # open only by that test
        out["minimum_detectable_effect"] = _open_mde(out["noninferiority"])
    if role == "control":
        out["resolved"] = verdict == "holds"
    return out


def gate_on_controls(verdicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Claims are interpreted only when every positive control resolved; otherwise each says why it is not."""
    controls = [v for v in verdicts if v.get("role") == "control"]
    failed = [c for c in controls if not c.get("resolved")]
    if not failed:
        return verdicts
    names = ", ".join(f"{c['id']} ({c['candidate']} vs {' / '.join(c['reference'])})" for c in failed)
    for v in verdicts:
        if v.get("role") == "control" or v["verdict"] == "not measured":
            continue
        v["raw_verdict"], v["verdict"] = v["verdict"], "not interpreted"
        v["plain"] = (
            f"Not interpreted: the positive control {names} did not resolve, so this study could not detect a known "
            f"effect; its raw reading was '{v['raw_verdict']}'. Run more seeds or steps."
        )
    return verdicts


def evaluate_claims(
    claims: Sequence[Any],
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    arm_of: Mapping[str, str],
    skipped: Mapping[str, str],
) -> list[dict[str, Any]]:
    """Every claim and control of a study, in file order, gated on the controls (:func:`gate_on_controls`)."""
    return gate_on_controls([evaluate_claim(c, rows, metric, arm_of, skipped) for c in claims])


def claims_files(verdicts: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(claims.json rows, controls.json rows)``: the fields a reader or another tool needs, without the prose."""
    keys = (
        "id",
        "claim",
        "source",
        "arms",
        "candidate",
        "reference",
        "metric",
        "difference",
        "interval",
        "p",
        "verdict",
        "minimum_detectable_effect",
        "margin",
        "comparisons",
        "noninferiority",
    )
    claims = [
        {k: v.get(k) for k in keys} | ({"raw_verdict": v["raw_verdict"]} if "raw_verdict" in v else {})
        for v in verdicts
        if v.get("role") != "control"
    ]
    controls = [
        {
            "control": v["claim"],
            "id": v["id"],
            "candidate": v["candidate"],
            "reference": v["reference"],
            "metric": v.get("metric"),
            "difference": v.get("difference"),
            "interval": v.get("interval"),
            "p": v.get("p"),
            "minimum_detectable_effect": v.get("minimum_detectable_effect"),
            "resolved": bool(v.get("resolved")),
        }
        for v in verdicts
        if v.get("role") == "control"
    ]
    return claims, controls
