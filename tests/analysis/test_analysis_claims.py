"""Claims, controls and their statistics: clipped intervals, deterministic differences, equivalence (TOST),
the minimum detectable effect, and the positive control that gates every claim.

Expected numbers use Student's t closed forms for 2 degrees of freedom (``t_q = (2q - 1) / sqrt(2 q (1 - q))``)
or scipy's t distribution directly, never the functions under test.
"""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats as sps

from audiomoe.analysis.claims import claims_files, evaluate_claims
from audiomoe.analysis.stats import (
    aggregate,
    equivalence,
    metric_range,
    minimum_detectable_effect,
    paired_test,
    summarize,
)
from audiomoe.analysis.study import ClaimSpec


def _tq(q: float) -> float:  # Student t quantile, 2 degrees of freedom, closed form
    return (2 * q - 1) / math.sqrt(2 * q * (1 - q))


def test_intervals_never_leave_the_metric_range():
    s = summarize([0.98, 0.99, 0.5], bounds=metric_range("event/accuracy"))
    assert s.ci_low >= 0.0 and s.ci_high == 1.0  # unclipped the t interval reaches past 1
    raw = summarize([0.98, 0.99, 0.5])
    assert raw.ci_high > 1.0
    rows = [{"config": "a", "seed": i, "status": "ok", "mean/accuracy": v} for i, v in enumerate([0.05, 0.9])]
    agg = aggregate(rows, ["mean/accuracy"])[0]
    assert agg["mean/accuracy/ci_low"] == 0.0 and agg["mean/accuracy/ci_high"] == 1.0  # n=2: t interval of ±5.4
    d = paired_test({0: 0.9, 1: 0.1}, {0: 0.1, 1: 0.9}, bounds=metric_range("x/accuracy", difference=True))
    assert d.ci_low == -1.0 and d.ci_high == 1.0
    assert metric_range("final_loss") is None and metric_range("moe_mflops_per_audio_s", difference=True) is None


def test_a_deterministic_difference_has_no_interval_or_p_value_in_text_and_files():
    t = paired_test({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.468, 1: 0.568, 2: 0.668})
    assert t.deterministic and t.mean_diff == pytest.approx(0.032)
    assert t.text() == "+0.032 (the same at all 3 seeds: deterministic, no interval)"
    assert "[" not in summarize([0.25, 0.25, 0.25]).text() and summarize([0.25, 0.25]).deterministic


def test_equivalence_two_one_sided_tests_on_a_constructed_example():
    diffs = [0.004, -0.003, 0.002, 0.001, -0.002]
    t = paired_test({i: 0.5 + d for i, d in enumerate(diffs)}, {i: 0.5 for i in range(5)})
    n, mean = 5, sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    se = sd / math.sqrt(n)
    p_expected = max(sps.t.sf((mean + 0.02) / se, 4), sps.t.cdf((mean - 0.02) / se, 4))
    eq = equivalence(t, margin=0.02)
    assert eq["equivalent"] and eq["p"] == pytest.approx(p_expected, rel=1e-6) and eq["p"] < 0.001
    assert -0.02 < eq["ci_low"] < eq["ci_high"] < 0.02
    wide = paired_test({0: 0.6, 1: 0.4, 2: 0.55}, {0: 0.5, 1: 0.5, 2: 0.5})  # spread 0.1: cannot be shown within 0.02
    assert not equivalence(wide, 0.02)["equivalent"]
    off = paired_test({0: 0.53, 1: 0.531, 2: 0.529}, {0: 0.5, 1: 0.5, 2: 0.5})  # precise, but 0.03 away: not equivalent
    assert not equivalence(off, 0.02)["equivalent"] and equivalence(off, 0.05)["equivalent"]


def test_minimum_detectable_effect_by_hand():
    # n = 3 pairs, sd 0.1: (t_{0.975,2} + t_{0.8,2}) * 0.1 / sqrt(3)
    assert minimum_detectable_effect(3, 0.1) == pytest.approx((_tq(0.975) + _tq(0.8)) * 0.1 / math.sqrt(3), rel=1e-9)
    assert minimum_detectable_effect(3, 0.1) == pytest.approx(0.309660, abs=1e-5)
    assert minimum_detectable_effect(8, 0.1) < minimum_detectable_effect(3, 0.1) / 2  # more seeds: much more power
    assert math.isnan(minimum_detectable_effect(1, 0.1)) and minimum_detectable_effect(4, 0.0) == 0.0


def _rows(values: dict[str, list[float]], metric: str = "mean/accuracy") -> list[dict]:
    return [{"config": c, "seed": s, "status": "ok", metric: v} for c, vs in values.items() for s, v in enumerate(vs)]


def _claims(control_candidate: str = "trained") -> list[ClaimSpec]:
    return [
        ClaimSpec(
            id=0,
            role="control",
            text="training helps",
            kind="better",
            candidate=control_candidate,
            reference=["untrained"],
        ),
        ClaimSpec(id=1, text="a beats b", kind="better", candidate="a", reference=["b"], also=["worst/accuracy"]),
        ClaimSpec(id=2, text="c is as good as b", kind="better", candidate="c", reference=["b"], margin=0.02),
    ]


ARMS = {"trained": "ctl", "untrained": "ctl", "a": "x", "b": "x", "c": "x"}


def test_claims_are_interpreted_once_the_positive_control_resolves(tmp_path):
    rows = _rows(
        {
            "trained": [0.60, 0.62, 0.61, 0.63],
            "untrained": [0.13, 0.12, 0.14, 0.13],
            "a": [0.55, 0.56, 0.58, 0.57],
            "b": [0.50, 0.50, 0.51, 0.52],
            "c": [0.501, 0.499, 0.512, 0.519],
        }
    )
    out = {v["id"]: v for v in evaluate_claims(_claims(), rows, "mean/accuracy", ARMS, {})}
    assert out[0]["resolved"] and out[0]["verdict"] == "holds"
    assert out[1]["verdict"] == "holds" and out[1]["interval"][0] > 0 and out[1]["minimum_detectable_effect"] > 0
    assert out[2]["verdict"] == "equivalent" and out[2]["comparisons"][0]["equivalent"]
    assert "exploratory worst/accuracy" in out[1]["differences"]
    claims, controls = claims_files(list(out.values()))
    assert [c["id"] for c in claims] == [1, 2] and controls[0]["resolved"] is True
    for c in claims:
        assert set(c) >= {
            "claim",
            "arms",
            "metric",
            "difference",
            "interval",
            "p",
            "verdict",
            "minimum_detectable_effect",
        }
    json.dumps(claims), json.dumps(controls)  # plain JSON, no NaN objects


def test_an_underpowered_study_refuses_to_interpret_its_claims():
    # two seeds and a noisy control: its interval contains 0 (t_{0.975,1} = 12.7), so nothing is interpreted
    rows = _rows(
        {"trained": [0.60, 0.20], "untrained": [0.13, 0.15], "a": [0.55, 0.56], "b": [0.30, 0.31], "c": [0.3, 0.31]}
    )
    out = {v["id"]: v for v in evaluate_claims(_claims(), rows, "mean/accuracy", ARMS, {})}
    assert out[0]["resolved"] is False and out[0]["verdict"] == "not resolved"
    assert (
        out[1]["verdict"] == "not interpreted" and out[1]["raw_verdict"] == "holds"
    )  # a's gain would otherwise read as real
    assert "positive control" in out[1]["plain"] and "did not resolve" in out[1]["plain"]
    claims, controls = claims_files(list(out.values()))
    assert controls[0]["resolved"] is False and all(c["verdict"] == "not interpreted" for c in claims)


def test_a_claim_can_name_its_own_metric():
    rows = _rows({"a": [0.3, 0.31, 0.29], "b": [0.3, 0.3, 0.3]})
    rows += [
        {"config": c, "seed": s, "status": "ok", "event/accuracy": v}
        for c, vs in {"a": [0.8, 0.82, 0.81], "b": [0.5, 0.52, 0.49]}.items()
        for s, v in enumerate(vs)
    ]
    merged: dict = {}
    for r in rows:
        merged.setdefault((r["config"], r["seed"]), {}).update(r)
    claim = ClaimSpec(
        id=3, text="a helps the minority", kind="better", candidate="a", reference=["b"], metric="event/accuracy"
    )
    (v,) = evaluate_claims([claim], list(merged.values()), "mean/accuracy", {"a": "x", "b": "x"}, {})
    assert v["metric"] == "event/accuracy" and v["verdict"] == "holds"


def test_the_report_shows_the_control_first_and_no_verdict_while_it_has_not_resolved(tmp_path):
    from audiomoe.analysis.report_blocks import claims_blocks
    from audiomoe.analysis.report_html import render

    rows = _rows(
        {"trained": [0.60, 0.20], "untrained": [0.13, 0.15], "a": [0.55, 0.56], "b": [0.30, 0.31], "c": [0.3, 0.31]}
    )
    blocks = claims_blocks(evaluate_claims(_claims(), rows, "mean/accuracy", ARMS, {}))
    md, _ = render(blocks, tmp_path, "t")
    assert md.index("Positive controls") < md.index("Paper claims at this scale")
    control = next(b for b in blocks if b[0] == "table" and b[1][1] == "control")
    assert control[2][0][2] == "no"
    claims = next(b for b in blocks if b[0] == "table" and b[1][1] == "claim")
    assert [r[3] for r in claims[2]] == ["not interpreted", "not interpreted"]
    assert "holds" not in " ".join(str(r[3]) for r in claims[2])


def _two_metrics(minority: dict[str, list[float]], majority: dict[str, list[float]]) -> list[dict]:
    merged: dict = {}
    for metric, values in (("event/accuracy", minority), ("language/accuracy", majority)):
        for r in _rows(values, metric):
            merged.setdefault((r["config"], r["seed"]), {}).update(r)
    return list(merged.values())


def test_a_minority_gain_holds_only_with_non_inferiority_on_the_majority():
    claim = ClaimSpec(
        id=3,
        text="the curriculum helps the minority",
        kind="better",
        candidate="a",
        reference=["b"],
        metric="event/accuracy",
        noninferior=["language/accuracy"],
        margin=0.03,
    )
    gain = {"a": [0.80, 0.82, 0.81, 0.83], "b": [0.50, 0.52, 0.49, 0.51]}

    def verdict(majority: dict[str, list[float]]) -> dict:
        (v,) = evaluate_claims([claim], _two_metrics(gain, majority), "mean/accuracy", {"a": "x", "b": "x"}, {})
        return v

    same = verdict({"a": [0.600, 0.610, 0.605, 0.598], "b": [0.601, 0.607, 0.604, 0.600]})
    assert same["verdict"] == "holds" and same["noninferiority"][0]["state"] == "non-inferior"
    worse = verdict({"a": [0.50, 0.51, 0.49, 0.50], "b": [0.60, 0.61, 0.60, 0.62]})  # -0.11: beyond the margin
    assert worse["verdict"] == "does not hold" and "worse by more than 0.03" in worse["plain"]
    unclear_majority = {"a": [0.55, 0.62, 0.58, 0.60], "b": [0.60, 0.60, 0.60, 0.60]}
    unclear = verdict(unclear_majority)  # -0.0125, wide interval
    assert unclear["verdict"] == "not resolved" and unclear["noninferiority"][0]["state"] == "not shown"
    assert "non-inferiority within -0.03 is not shown on language/accuracy" in unclear["plain"]
    # what keeps it open is the majority test, so its power is the claim's (not the primary test's, sd 0.013)
    ni_mde = unclear["noninferiority"][0]["minimum_detectable_effect"]
    assert unclear["minimum_detectable_effect"] == ni_mde > 0.05
    assert f"detect a difference of {ni_mde:.3f} or more there" in unclear["plain"]
    neither = evaluate_claims(  # the primary test is open too: the claim's power stays the primary test's
        [claim],
        _two_metrics({"a": [0.80, 0.50, 0.75, 0.55], "b": [0.60, 0.62, 0.61, 0.63]}, unclear_majority),
        "mean/accuracy",
        {"a": "x", "b": "x"},
        {},
    )[0]
    assert neither["verdict"] == "not resolved" and neither["minimum_detectable_effect"] > 0.2
    claims, _ = claims_files([unclear])
    assert claims[0]["noninferiority"][0]["metric"] == "language/accuracy"


def test_a_candidate_equivalent_to_one_reference_does_not_beat_them_all():
    """MoWE's claim 2 shape: the combined router equals one router alone within the margin (TOST) and is unclear
    against the other: no meaningful gain over every reference, so the claim does not hold (and says which)."""
    rows = _rows(
        {
            "a": [0.538, 0.521, 0.497, 0.518],
            "b": [0.522, 0.521, 0.518, 0.524],  # a - b: -0.003, sd 0.015: inside ±0.03 by TOST
            "c": [0.515, 0.488, 0.498, 0.442],  # a - c: +0.033, sd 0.032: interval contains 0
        }
    )
    claim = ClaimSpec(id=2, text="a beats b and c", kind="better", candidate="a", reference=["b", "c"], margin=0.03)
    (v,) = evaluate_claims([claim], rows, "mean/accuracy", {"a": "x", "b": "x", "c": "x"}, {})
    by_ref = {r["reference"]: r for r in v["comparisons"]}
    assert by_ref["b"]["equivalent"] and not by_ref["c"]["equivalent"] and by_ref["c"]["interval"][0] < 0
    assert v["verdict"] == "does not hold" and "equivalent to b within ±0.03" in v["plain"]
    alone = ClaimSpec(id=2, text="a beats c", kind="better", candidate="a", reference=["c"], margin=0.03)
    (w,) = evaluate_claims([alone], rows, "mean/accuracy", {"a": "x", "b": "x", "c": "x"}, {})
    assert w["verdict"] == "not resolved"  # without the equivalent reference nothing is decided


def _cheaper_claim() -> ClaimSpec:
    """Claim 4's shape: candidate p cheaper than reference k at equal quality within 0.03."""
    return ClaimSpec(
        id=4,
        text="p is cheaper at equal quality",
        kind="cheaper_at_equal_quality",
        candidate="p",
        reference=["k"],
        cost="moe_mflops_per_audio_s",
        margin=0.03,
    )


def test_a_cheaper_at_equal_quality_claim_reads_as_a_sentence_for_each_cost_outcome():
    claim = _cheaper_claim()

    def plain(cost_p: list[float]) -> dict:
        rows = _rows({"p": [0.50, 0.51, 0.50, 0.52], "k": [0.50, 0.50, 0.51, 0.51]})
        for r, c in zip(rows, cost_p + [3.8] * 4):
            r["moe_mflops_per_audio_s"] = c
        (v,) = evaluate_claims([claim], rows, "mean/accuracy", {"p": "x", "k": "x"}, {})
        return v

    cheaper = plain([3.2, 3.3, 3.25, 3.3])
    assert cheaper["verdict"] == "holds" and "p costs less than k in moe_mflops_per_audio_s and" in cheaper["plain"]
    same = plain([3.0, 4.6, 3.2, 4.5])
    assert same["verdict"] == "not resolved"
    assert "p costs about the same as k (interval contains 0) in moe_mflops_per_audio_s and" in same["plain"]
    assert " than k" not in same["plain"]


def test_a_cheaper_claim_whose_quality_is_open_says_what_these_seeds_can_detect():
    """Claim 4's shape: cheaper, quality interval straddling -margin: the text gives the power of these seeds."""
    claim = _cheaper_claim()
    rows = _rows({"p": [0.40, 0.33, 0.37, 0.30], "k": [0.36, 0.36, 0.36, 0.36]})  # -0.01, sd 0.045
    for r in rows:
        r["moe_mflops_per_audio_s"] = 3.2 if r["config"] == "p" else 3.8
    (v,) = evaluate_claims([claim], rows, "mean/accuracy", {"p": "x", "k": "x"}, {})
    assert v["verdict"] == "not resolved"
    mde = v["minimum_detectable_effect"]
    assert 0.08 < mde < 0.2 and f"these seeds detect a difference of {mde:.3f} or more" in v["plain"]
