"""Statistics over seeds: mean +- std, a t-distribution confidence interval, paired tests against a baseline.

For ``n`` seeds with values ``x_i``: ``mean = sum x_i / n``, ``std`` the sample standard deviation
(``ddof = 1``), ``sem = std / sqrt(n)`` and the interval ``mean +- t_{(1+c)/2, n-1} * sem`` (Student's t,
``c`` = 0.95 by default). A difference against a baseline pairs the runs by seed (same seed = same
data order and eval batches, so the pairing removes that noise): ``d_i = cand_i - base_i``, the same
interval on ``mean(d)``, and the two-sided paired t-test ``t = mean(d) / (std(d) / sqrt(n))``
(:func:`scipy.stats.ttest_rel`). Non-finite values (a failed run, a metric a run lacks) are left out
and the count says so. One value has no spread: its std, interval and p-value are NaN.

Intervals never leave the metric's range (:func:`metric_range`: an accuracy lies in [0, 1], a difference
of two in [-1, 1]). A difference that is the same at every seed is *deterministic*: it is shown without
an interval or p-value (a t interval of zero width says nothing about a wider population of seeds).
Beside "higher / lower" a comparison can say *equivalent* (:func:`equivalence`, two one-sided tests
with a declared margin: the 1 - 2 alpha interval lies inside (-margin, +margin)), and
:func:`minimum_detectable_effect` says how large a difference these seeds could have detected
(power 0.8 at alpha 0.05: ``(t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)``), so that "not
resolved" tells "underpowered" from "equivalent".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from audiomoe.core.errors import AudioMoEError


@dataclass(frozen=True)
class Summary:
    """Mean, sample std, standard error and a ``confidence`` interval of ``n`` values."""

    n: int
    mean: float
    std: float
    sem: float
    ci_low: float
    ci_high: float
    confidence: float = 0.95

    @property
    def deterministic(self) -> bool:
        """Every value equal (n >= 2): a constant, to be shown without an interval."""
        return self.n >= 2 and self.std == 0.0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """The fields as ``{prefix + name: value}`` (for CSV rows)."""
        return {f"{prefix}{k}": v for k, v in asdict(self).items() if k != "confidence"}

    def text(self, digits: int = 3) -> str:
        """``0.512 ± 0.020 [0.470, 0.554] (n=3)``; ``0.512 (n=1)`` without spread."""
        f = f"{{:.{digits}f}}"
        if self.n == 0:
            return "n/a"
        if not math.isfinite(self.std):
            return f"{f.format(self.mean)} (n={self.n})"
        if self.deterministic:
            return f"{f.format(self.mean)} (the same at all {self.n})"
        return f"{f.format(self.mean)} ± {f.format(self.std)} [{f.format(self.ci_low)}, {f.format(self.ci_high)}] (n={self.n})"


@dataclass(frozen=True)
class PairedTest:
    """Candidate minus baseline over the seeds both have: the mean difference, its interval and a paired t-test."""

    n: int
    mean_diff: float
    std_diff: float
    ci_low: float
    ci_high: float
    t: float
    p: float
    seeds: tuple[Any, ...] = ()
    confidence: float = 0.95

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        """The fields as ``{prefix + name: value}`` (seeds joined by ``;``)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("confidence", "seeds")}
        d["seeds"] = ";".join(str(s) for s in self.seeds)
        return {f"{prefix}{k}": v for k, v in d.items()}

    @property
    def deterministic(self) -> bool:
        """The difference is the same at every pair (n >= 2): no interval or p-value describes it."""
        return self.n >= 2 and self.std_diff == 0.0

    def text(self, digits: int = 3) -> str:
        """``+0.050 [+0.010, +0.090], p = 0.02, n = 4``; a deterministic difference without interval or p."""
        if self.n == 0:
            return "n/a"
        d = f"{self.mean_diff:+.{digits}f}"
        if self.deterministic:
            return f"{d} (the same at all {self.n} seeds: deterministic, no interval)"
        if self.n < 2 or not math.isfinite(self.ci_low):
            return f"{d} ({self.n} pair: no interval)"
        p = "n/a" if not math.isfinite(self.p) else f"{self.p:.2g}"
        return f"{d} [{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}], p = {p}, n = {self.n}"

    def verdict(self) -> str:
        """``higher`` / ``lower`` when the interval excludes 0, ``identical`` when every pair is equal, else
        ``unresolved`` (or ``n/a`` below 2 pairs)."""
        if self.n < 2 or not math.isfinite(self.ci_low):
            return "n/a"
        if self.mean_diff == 0 and self.std_diff == 0:
            return "identical"
        if self.ci_low > 0:
            return "higher"
        if self.ci_high < 0:
            return "lower"
        return "unresolved"


def t_critical(df: int, confidence: float = 0.95) -> float:
    """Two-sided Student-t critical value ``t_{(1+confidence)/2, df}`` (scipy)."""
    if df < 1:
        return math.nan
    if not 0.0 < confidence < 1.0:
        raise AudioMoEError(f"confidence must be in (0, 1), got {confidence!r}; use e.g. 0.95")
    from scipy import stats as sps

    return float(sps.t.ppf(0.5 + confidence / 2.0, df))


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


Bounds = Optional[tuple[float, float]]

#: relative spread below which values count as equal (the rounding of a subtraction, not a seed's effect)
CONSTANT_TOL = 1e-9

#: metric name endings whose values lie in [0, 1] (a fraction of items); differences of them lie in [-1, 1]
UNIT_METRICS = ("accuracy", "f1", "precision", "recall", "null_share", "wer_capped", "top_prob")


def metric_range(metric: str, difference: bool = False) -> Bounds:
    """The range a metric's values (or, with ``difference``, two values' difference) can take; None when unbounded."""
    if metric.rsplit("/", 1)[-1] in UNIT_METRICS:
        return (-1.0, 1.0) if difference else (0.0, 1.0)
    return None


def _clip(lo: float, hi: float, bounds: Bounds) -> tuple[float, float]:
    if bounds is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return lo, hi
    return max(lo, bounds[0]), min(hi, bounds[1])


def summarize(values: Iterable[Any], confidence: float = 0.95, bounds: Bounds = None) -> Summary:
    """Mean, std (ddof 1), sem and the t interval of the finite ``values`` (others are skipped), the
    interval clipped to ``bounds`` (the metric's range, :func:`metric_range`)."""
    xs = _finite(values)
    n = len(xs)
    nan = math.nan
    if n == 0:
        return Summary(0, nan, nan, nan, nan, nan, confidence)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, nan, nan, nan, nan, confidence)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    if std <= CONSTANT_TOL * max(
        1.0, abs(mean)
    ):  # float noise of equal values (0.5 - 0.468 vs 0.6 - 0.568) is no spread
        std = 0.0
    sem = std / math.sqrt(n)
    half = t_critical(n - 1, confidence) * sem
    lo, hi = _clip(mean - half, mean + half, bounds)
    return Summary(n, mean, std, sem, lo, hi, confidence)


def paired_test(
    candidate: Mapping[Any, Any], baseline: Mapping[Any, Any], confidence: float = 0.95, bounds: Bounds = None
) -> PairedTest:
    """Paired comparison of ``{seed: value}`` maps over the seeds both have finite values for (the
    difference's interval clipped to ``bounds``)."""
    seeds = tuple(sorted(s for s in candidate if s in baseline and _finite([candidate[s]]) and _finite([baseline[s]])))
    a = [float(candidate[s]) for s in seeds]
    b = [float(baseline[s]) for s in seeds]
    diffs = [x - y for x, y in zip(a, b)]
    s = summarize(diffs, confidence, bounds)
    t = p = math.nan
    if s.n >= 2:
        if s.std == 0.0:  # identical differences: the test statistic is infinite (or undefined when 0)
            t = math.copysign(math.inf, s.mean) if s.mean else math.nan
            p = 0.0 if s.mean else 1.0
        else:
            from scipy import stats as sps

            res = sps.ttest_rel(a, b)
            t, p = float(res.statistic), float(res.pvalue)
    return PairedTest(s.n, s.mean, s.std, s.ci_low, s.ci_high, t, p, seeds, confidence)


def aggregate(
    rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], by: str = "config", confidence: float = 0.95
) -> list[dict[str, Any]]:
    """One row per ``by`` value (first-seen order): ``runs``, ``ok`` and per metric ``<m>/mean, /std, /ci_low, /ci_high, /n``."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get(by), []).append(r)
    out = []
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("status") in (None, "ok")]
        row: dict[str, Any] = {by: key, "runs": len(rs), "ok": len(ok)}
        for m in metrics:
            s = summarize((r.get(m) for r in ok), confidence, metric_range(m))
            row.update({f"{m}/{k}": v for k, v in s.as_dict().items() if k != "sem"})
        out.append(row)
    return out


def compare(
    rows: Sequence[Mapping[str, Any]],
    baseline: str,
    metrics: Sequence[str],
    by: str = "config",
    seed_key: str = "seed",
    confidence: float = 0.95,
    configs: Optional[Sequence[str]] = None,
) -> list[dict[str, Any]]:
    """Every other config against ``baseline``, paired by seed, per metric: one row per (config, metric)."""
    by_cfg: dict[Any, dict[Any, Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("status") in (None, "ok"):
            by_cfg.setdefault(r.get(by), {})[r.get(seed_key)] = r
    names = list(configs) if configs is not None else list(dict.fromkeys(r.get(by) for r in rows))
    if baseline not in names:
        raise AudioMoEError(
            f"baseline '{baseline}' is not one of the configs ({', '.join(map(str, names))}); pass --baseline with one of them"
        )
    base = by_cfg.get(baseline, {})
    out = []
    for name in names:
        if name == baseline:
            continue
        cand = by_cfg.get(name, {})
        for m in metrics:
            test = paired_test(
                {s: r.get(m) for s, r in cand.items()},
                {s: r.get(m) for s, r in base.items()},
                confidence,
                metric_range(m, difference=True),
            )
            out.append({by: name, "baseline": baseline, "metric": m, **test.as_dict(), "verdict": test.verdict()})
    return out


def _t_quantile(q: float, df: int) -> float:
    from scipy import stats as sps

    return float(sps.t.ppf(q, df))


def equivalence(test: PairedTest, margin: float, alpha: float = 0.05) -> dict[str, Any]:
    """Two one-sided tests (TOST) that the true difference lies inside ``(-margin, +margin)``.

    ``p = max(p_lower, p_upper)`` of the one-sided t-tests of ``d > -margin`` and ``d < +margin``;
    *equivalent* when ``p < alpha``, which is the same as the ``1 - 2 alpha`` interval of the
    difference lying inside the margin. A deterministic difference is equivalent when it lies inside.
    """
    if margin <= 0:
        raise AudioMoEError(f"an equivalence margin must be positive, got {margin!r}")
    out: dict[str, Any] = {"margin": margin, "alpha": alpha, "p": math.nan, "equivalent": False}
    if test.n < 2:
        return out
    if test.deterministic:
        inside = abs(test.mean_diff) < margin
        return {
            **out,
            "p": 0.0 if inside else 1.0,
            "equivalent": inside,
            "ci_low": test.mean_diff,
            "ci_high": test.mean_diff,
        }
    from scipy import stats as sps

    df, se = test.n - 1, test.std_diff / math.sqrt(test.n)
    p_low = float(sps.t.sf((test.mean_diff + margin) / se, df))  # H0: d <= -margin
    p_high = float(sps.t.cdf((test.mean_diff - margin) / se, df))  # H0: d >= +margin
    half = _t_quantile(1.0 - alpha, df) * se
    p = max(p_low, p_high)
    return {**out, "p": p, "equivalent": p < alpha, "ci_low": test.mean_diff - half, "ci_high": test.mean_diff + half}


def minimum_detectable_effect(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true paired difference a two-sided t-test at ``alpha`` detects with ``power``, given ``n``
    pairs whose differences have standard deviation ``sd``: ``(t_{1-alpha/2, n-1} + t_{power, n-1}) sd / sqrt(n)``
    (the usual normal-approximation formula with t quantiles). NaN below 2 pairs; 0 for a deterministic difference."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0.0:
        return 0.0
    df = n - 1
    return (_t_quantile(1.0 - alpha / 2.0, df) + _t_quantile(power, df)) * sd / math.sqrt(n)
