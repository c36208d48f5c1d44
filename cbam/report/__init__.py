"""The comparison report: finished runs grouped by variant, mean ± std over seeds, Welch's test against the
baseline, a fairness check of the configs, plots, Markdown/CSV/HTML and one W&B summary run."""

from .report import Comparison, build, compare
from .stats import Test, holm, mean_std, paired, welch

__all__ = ["Comparison", "Test", "build", "compare", "holm", "mean_std", "paired", "welch"]
