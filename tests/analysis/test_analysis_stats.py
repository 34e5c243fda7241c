"""Statistics over seeds (audiomoe.analysis.stats) against hand computations on fixed numbers.

For 2 degrees of freedom Student's t has closed forms: the quantile ``t_q = (2q - 1) / sqrt(2 q (1 - q))``
and the two-sided p-value ``p = 1 - |t| / sqrt(2 + t^2)``, so the expected numbers below are computed
by hand, not by the library under test.
"""

from __future__ import annotations

import math

import pytest

from audiomoe.analysis.stats import aggregate, compare, paired_test, summarize, t_critical
from audiomoe.core.errors import AudioMoEError

T2_975 = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # 4.302652...


def test_t_critical_matches_the_closed_form_for_two_degrees_of_freedom():
    assert t_critical(2) == pytest.approx(T2_975, rel=1e-9)
    assert t_critical(2) == pytest.approx(4.302653, abs=1e-6)
    assert t_critical(1) == pytest.approx(12.706205, abs=1e-6)  # the 2-seed interval is wide: say so in reports
    with pytest.raises(AudioMoEError, match="confidence"):
        t_critical(3, 1.5)


def test_summary_mean_std_and_interval_by_hand():
    s = summarize([0.5, 0.6, 0.7])
    # mean 0.6; deviations -0.1, 0, 0.1 -> variance 0.02 / 2 = 0.01 -> std 0.1; sem 0.1 / sqrt(3)
    sem = 0.1 / math.sqrt(3)
    assert (s.n, s.mean, s.std, s.sem) == (3, pytest.approx(0.6), pytest.approx(0.1), pytest.approx(sem))
    assert s.ci_low == pytest.approx(0.6 - T2_975 * sem) and s.ci_high == pytest.approx(0.6 + T2_975 * sem)
    assert s.ci_low == pytest.approx(0.351586, abs=1e-6)
    assert s.text() == "0.600 ± 0.100 [0.352, 0.848] (n=3)"


def test_summary_skips_failed_runs_and_has_no_spread_with_one_value():
    s = summarize([0.5, None, float("nan"), "x", 0.7, 0.6])
    assert s.n == 3 and s.mean == pytest.approx(0.6)
    one = summarize([0.42])
    assert one.n == 1 and one.mean == 0.42 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert one.text() == "0.420 (n=1)"
    assert summarize([]).n == 0 and summarize([]).text() == "n/a"


def test_paired_test_by_hand():
    cand = {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9}
    base = {0: 0.4, 1: 0.55, 2: 0.5, 7: 0.1}  # seed 3 and seed 7 have no partner: left out
    t = paired_test(cand, base)
    # d = 0.1, 0.05, 0.2: mean 0.116667; squared deviations sum 0.0116667 -> std sqrt(0.0058333)
    mean = (0.1 + 0.05 + 0.2) / 3
    std = math.sqrt(((0.1 - mean) ** 2 + (0.05 - mean) ** 2 + (0.2 - mean) ** 2) / 2)
    tstat = mean / (std / math.sqrt(3))
    assert t.seeds == (0, 1, 2) and t.n == 3
    assert t.mean_diff == pytest.approx(mean) and t.std_diff == pytest.approx(std)
    assert t.t == pytest.approx(tstat) and t.t == pytest.approx(2.645751, abs=1e-6)
    assert t.p == pytest.approx(1 - tstat / math.sqrt(2 + tstat**2)) and t.p == pytest.approx(0.118083, abs=1e-6)
    assert t.ci_low == pytest.approx(mean - T2_975 * std / math.sqrt(3))
    assert t.verdict() == "unresolved"  # the interval [-0.073, 0.306] contains 0


def test_paired_verdicts_and_constant_differences():
    assert paired_test({0: 1.0, 1: 2.0, 2: 3.05}, {0: 0.0, 1: 1.0, 2: 2.0}).verdict() == "higher"
    assert paired_test({0: 0.0, 1: 1.0, 2: 2.0}, {0: 1.0, 1: 2.0, 2: 3.05}).verdict() == "lower"
    same = paired_test({0: 0.3, 1: 0.3}, {0: 0.1, 1: 0.1})  # identical differences: t infinite, p 0
    assert same.mean_diff == pytest.approx(0.2) and same.p == 0.0 and same.t == math.inf
    assert paired_test({0: 0.3}, {0: 0.1}).verdict() == "n/a"
    assert (
        paired_test({0: 1.0, 1: 1.0}, {0: 1.0, 1: 1.0}).verdict() == "identical"
    )  # not "unresolved": no difference at all


def test_aggregate_and_compare_rows():
    rows = [
        {"config": "a", "seed": 0, "status": "ok", "acc": 0.5},
        {"config": "a", "seed": 1, "status": "ok", "acc": 0.7},
        {"config": "b", "seed": 0, "status": "ok", "acc": 0.6},
        {"config": "b", "seed": 1, "status": "failed"},
    ]
    agg = aggregate(rows, ["acc"])
    assert [a["config"] for a in agg] == ["a", "b"]
    assert agg[0]["acc/mean"] == pytest.approx(0.6) and agg[0]["acc/n"] == 2
    assert agg[1]["runs"] == 2 and agg[1]["ok"] == 1 and agg[1]["acc/n"] == 1
    comp = compare(rows, "a", ["acc"])
    assert (
        len(comp) == 1 and comp[0]["config"] == "b" and comp[0]["n"] == 1 and comp[0]["mean_diff"] == pytest.approx(0.1)
    )
    with pytest.raises(AudioMoEError, match="baseline 'zz' is not one of the configs"):
        compare(rows, "zz", ["acc"])
