"""Welch's two-sample t-test, written out so the report shows exactly what it computes.

Welch's test does not assume equal variances (an attention module may well make training more or less
noisy across seeds). Only the t distribution itself (cdf, ppf) comes from scipy.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t


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
    """Welch's t-test of mean(a) - mean(b); the same numbers as `scipy.stats.ttest_ind(a, b, equal_var=False)`.

    Needs two values per sample. When both samples are constant (se = 0) the test is undefined and t,
    p, df and the interval are nan (scipy says t = +-inf, p = 0 when the means differ: two seeds that
    happen to agree are no proof), which the report shows as n/a.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs >= 2 values per sample, got {len(a)} and {len(b)}")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)  # squared standard errors of the two means
    diff = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return Welch(diff, 0.0, math.nan, math.nan, math.nan, math.nan, math.nan, confidence)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    t = diff / se
    p = 2 * student_t.cdf(-abs(t), df)  # the lower tail: no 1 - cdf cancellation for tiny p
    half = student_t.ppf(0.5 + confidence / 2, df) * se
    return Welch(diff, se, float(df), t, float(p), diff - half, diff + half, confidence)
