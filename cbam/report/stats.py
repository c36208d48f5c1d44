"""Welch's two-sample t-test with its confidence interval, as scipy computes them.

Welch's test does not assume equal variances (an attention module may well make training more or less
noisy across seeds).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Welch:
    diff: float  # mean(a) - mean(b)
    se: float  # standard error of the difference: sqrt(var_a/n_a + var_b/n_b)
    df: float  # Welch-Satterthwaite degrees of freedom
    t: float  # diff / se
    p: float  # two-sided
    ci_low: float
    ci_high: float
    confidence: float


def mean_std(x: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1; nan for a single value)."""
    x = np.asarray(x, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Welch:
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
    if se == 0:
        return Welch(diff, 0.0, math.nan, math.nan, math.nan, math.nan, math.nan, confidence)
    result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    return Welch(diff, se, float(result.df), float(result.statistic), float(result.pvalue), ci.low, ci.high, confidence)
