"""The comparison's statistics, from scipy: Welch's test, the paired test over shared seeds, Holm's
correction, equivalence by two one-sided tests, the seeds a decision would need, a bootstrap check and an
effect size.

Seeds pair the runs: with the same seed two variants see the same data order and augmentation, so the
per-seed difference removes that share of the variance. Welch's test (unequal variances) is the fallback
where the baseline and a variant share no seeds.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05  # for the whole table's family of comparisons (Holm)
POWER = 0.8  # that a test at the observed effect and variance decides, for the seeds a row would need
MAX_SEEDS = 200  # the planning's search stops here: "more than 200" is an answer too
BOOTSTRAP_MIN = 5  # samples per side below which a bootstrap interval says nothing
# Accuracies are counts over one val set: equal counts can differ in their last bits after the division and
# the subtraction, so a spread below this share of the values is no spread (a test on it would be on noise).
ROUNDING = 1e-9
BOOTSTRAP_RESAMPLES = 9999


@dataclass(frozen=True)
class Test:
    """A difference of means, mean(variant) - mean(baseline), with its interval and p."""

    kind: str  # "paired" or "welch"
    n: int  # pairs (paired) or the smaller sample (welch)
    diff: float
    se: float
    df: float
    t: float  # diff / se
    p: float  # two-sided
    ci_low: float
    ci_high: float
    confidence: float


def mean_std(x: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; nan for a single value)."""
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def _no_spread(se: float, *samples: np.ndarray) -> bool:
    return se <= ROUNDING * max(1.0, *(float(np.abs(x).max()) for x in samples))


def _undefined(kind: str, n: int, diff: float, confidence: float) -> Test:
    return Test(kind, n, diff, 0.0, math.nan, math.nan, math.nan, math.nan, math.nan, confidence)


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Test:
    """`scipy.stats.ttest_ind(a, b, equal_var=False)` of mean(a) - mean(b), and its confidence interval.

    Needs two values per sample. When both samples are constant (se = 0) the test is undefined and t,
    p, df and the interval are nan (scipy says t = +-inf, p = 0 when the means differ: two seeds that
    happen to agree are no proof), which the report shows as n/a.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs >= 2 values per sample, got {len(a)} and {len(b)}")
    diff = float(a.mean() - b.mean())
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    if _no_spread(se, a, b):
        return _undefined("welch", min(len(a), len(b)), diff, confidence)
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    return Test("welch", min(len(a), len(b)), diff, se, float(result.df), float(result.statistic),
                float(result.pvalue), ci.low, ci.high, confidence)  # fmt: skip


def paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Test:
    """`scipy.stats.ttest_rel(a, b)`: mean of the differences a_i - b_i (the same seed i), its t interval.
    Needs two pairs; differences that are all equal make it undefined (nan), as in welch."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = a - b
    if len(d) < 2:
        raise ValueError(f"the paired test needs >= 2 pairs, got {len(d)}")
    diff = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(len(d))
    if _no_spread(se, a, b):
        return _undefined("paired", len(d), diff, confidence)
    result = stats.ttest_rel(a, b)
    ci = result.confidence_interval(confidence)
    return Test("paired", len(d), diff, se, float(result.df), float(result.statistic), float(result.pvalue), ci.low,
                ci.high, confidence)  # fmt: skip


def holm(p: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest p times (m - i), made monotone, capped at 1; nan
    (an undefined test) stays nan and does not count in m."""
    p = np.asarray(p, dtype=float)
    finite = np.flatnonzero(np.isfinite(p))
    adjusted = np.full(len(p), math.nan)
    m = len(finite)
    running = 0.0
    for rank, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def tost(test: Test, margin: float) -> float:
    """Two one-sided tests of |difference| < margin: the larger of the two one-sided p-values (t with the
    test's se and df). Small: the difference is within +-margin."""
    if not math.isfinite(test.df):
        return math.nan
    lower = stats.t.sf((test.diff + margin) / test.se, test.df)  # H0: diff <= -margin
    upper = stats.t.cdf((test.diff - margin) / test.se, test.df)  # H0: diff >= +margin
    return float(max(lower, upper))


def _power_difference(effect: float, n: int, alpha: float, paired_design: bool) -> float:
    """Power of the two-sided t-test at n seeds per variant for a standardised effect (the noncentral t)."""
    df = n - 1 if paired_design else 2 * n - 2
    nc = effect * math.sqrt(n if paired_design else n / 2)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def _power_equivalence(effect: float, margin: float, n: int, alpha: float, paired_design: bool) -> float:
    """Power of TOST at n seeds for a true standardised difference `effect`, margin in sd units."""
    df = n - 1 if paired_design else 2 * n - 2
    scale = math.sqrt(n if paired_design else n / 2)
    crit = stats.t.ppf(1 - alpha, df)
    # Both one-sided tests reject: t_lower > crit and t_upper < -crit (approximated through the noncentral t).
    lower = stats.nct.sf(crit, df, (effect + margin) * scale)
    upper = stats.nct.cdf(-crit, df, (effect - margin) * scale)
    return float(max(0.0, lower + upper - 1))


def seeds_needed(test: Test, sd: float, margin: float, alpha: float) -> int | None:
    """Seeds per variant at which a test at the observed difference and spread (sd: of the per-seed
    differences when paired, else the variants' pooled sd) would decide with probability POWER: a
    difference, or equivalence within the margin, whichever needs fewer. None: more than MAX_SEEDS."""
    if not (math.isfinite(sd) and sd > 0):
        return None
    effect, m = abs(test.diff) / sd, margin / sd
    paired_design = test.kind == "paired"
    for n in range(3, MAX_SEEDS + 1):
        if effect > 0 and _power_difference(effect, n, alpha, paired_design) >= POWER:
            return n
        if abs(test.diff) < margin and _power_equivalence(effect, m, n, alpha, paired_design) >= POWER:
            return n
    return None


def bootstrap_ci(a: Sequence[float], b: Sequence[float] | None, confidence: float = 0.95) -> tuple[float, float]:
    """`scipy.stats.bootstrap` (BCa, seeded) of mean(a) (paired: a holds the differences, b is None) or of
    mean(a) - mean(b); nan where a side has fewer than BOOTSTRAP_MIN values or no spread."""
    samples = (np.asarray(a, float),) if b is None else (np.asarray(a, float), np.asarray(b, float))
    if min(len(s) for s in samples) < BOOTSTRAP_MIN or all(np.ptp(s) == 0 for s in samples):
        return math.nan, math.nan

    def statistic(*xs, axis=-1):
        return xs[0].mean(axis=axis) - (xs[1].mean(axis=axis) if len(xs) > 1 else 0)

    result = stats.bootstrap(
        samples, statistic, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES, method="BCa",
        paired=False, vectorized=True, rng=np.random.default_rng(0),
    )  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def pooled_sd(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """The sd of two samples pooled, each variance weighted by its degrees of freedom (Cohen's d's)."""
    return math.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))


def effect_size(test: Test, sd: float) -> float:
    """Cohen's d: the difference over the sd it is measured against (paired: d_z, the per-seed
    differences' sd; Welch: the pooled sd of the two variants, pooled_sd)."""
    return test.diff / sd if math.isfinite(sd) and sd > 0 else math.nan


def within_margin(p_equiv_holm: float, alpha: float = ALPHA) -> bool:
    """Whether two one-sided tests (Holm-adjusted) put the difference inside the margin."""
    return math.isfinite(p_equiv_holm) and p_equiv_holm < alpha


def verdict(test: Test | None, p_holm: float, p_equiv_holm: float, alpha: float = ALPHA) -> str:
    """better / worse (the Holm-adjusted p below alpha), equivalent (TOST, Holm-adjusted), else undecided."""
    if test is None or not math.isfinite(p_holm):
        return "undecided"
    if p_holm < alpha:
        return "better" if test.diff > 0 else "worse"
    if within_margin(p_equiv_holm, alpha):
        return "equivalent"
    return "undecided"
