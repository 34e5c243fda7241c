"""Statistics over seeds: mean +- std, a t-distribution confidence interval, paired tests against a baseline.

For ``n`` seeds with values ``x_i``: ``mean = sum x_i / n``, ``std`` the sample standard deviation
(``ddof = 1``), ``sem = std / sqrt(n)`` and the interval ``mean +- t_{(1+c)/2, n-1} * sem`` (Student's t,
``c`` = 0.95 by default). A difference against a baseline pairs the runs by seed (same seed = same
data order and eval batches, so the pairing removes that noise): ``d_i = cand_i - base_i``, the same
interval on ``mean(d)``, and the two-sided paired t-test ``t = mean(d) / (std(d) / sqrt(n))``
(:func:`scipy.stats.ttest_rel`). Non-finite values (a failed run, a metric a run lacks) are left out
and the count says so. One value has no spread: its std, interval and p-value are NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..core.errors import AudioMoEError


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


def summarize(values: Iterable[Any], confidence: float = 0.95) -> Summary:
    """Mean, std (ddof 1), sem and the t interval of the finite ``values`` (others are skipped)."""
    xs = _finite(values)
    n = len(xs)
    nan = math.nan
    if n == 0:
        return Summary(0, nan, nan, nan, nan, nan, confidence)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, nan, nan, nan, nan, confidence)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    sem = std / math.sqrt(n)
    half = t_critical(n - 1, confidence) * sem
    return Summary(n, mean, std, sem, mean - half, mean + half, confidence)


def paired_test(candidate: Mapping[Any, Any], baseline: Mapping[Any, Any], confidence: float = 0.95) -> PairedTest:
    """Paired comparison of ``{seed: value}`` maps over the seeds both have finite values for."""
    seeds = tuple(sorted(s for s in candidate if s in baseline and _finite([candidate[s]]) and _finite([baseline[s]])))
    a = [float(candidate[s]) for s in seeds]
    b = [float(baseline[s]) for s in seeds]
    diffs = [x - y for x, y in zip(a, b)]
    s = summarize(diffs, confidence)
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


def aggregate(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], by: str = "config", confidence: float = 0.95) -> list[dict[str, Any]]:
    """One row per ``by`` value (first-seen order): ``runs``, ``ok`` and per metric ``<m>/mean, /std, /ci_low, /ci_high, /n``."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get(by), []).append(r)
    out = []
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("status") in (None, "ok")]
        row: dict[str, Any] = {by: key, "runs": len(rs), "ok": len(ok)}
        for m in metrics:
            s = summarize((r.get(m) for r in ok), confidence)
            row.update({f"{m}/{k}": v for k, v in s.as_dict().items() if k != "sem"})
        out.append(row)
    return out


def compare(
    rows: Sequence[Mapping[str, Any]], baseline: str, metrics: Sequence[str], by: str = "config", seed_key: str = "seed", confidence: float = 0.95,
    configs: Optional[Sequence[str]] = None,
) -> list[dict[str, Any]]:
    """Every other config against ``baseline``, paired by seed, per metric: one row per (config, metric)."""
    by_cfg: dict[Any, dict[Any, Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("status") in (None, "ok"):
            by_cfg.setdefault(r.get(by), {})[r.get(seed_key)] = r
    names = list(configs) if configs is not None else list(dict.fromkeys(r.get(by) for r in rows))
    if baseline not in names:
        raise AudioMoEError(f"baseline '{baseline}' is not one of the configs ({', '.join(map(str, names))}); pass --baseline with one of them")
    base = by_cfg.get(baseline, {})
    out = []
    for name in names:
        if name == baseline:
            continue
        cand = by_cfg.get(name, {})
        for m in metrics:
            test = paired_test({s: r.get(m) for s, r in cand.items()}, {s: r.get(m) for s, r in base.items()}, confidence)
            out.append({by: name, "baseline": baseline, "metric": m, **test.as_dict(), "verdict": test.verdict()})
    return out
