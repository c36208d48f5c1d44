"""One row per variant: accuracy over seeds, its difference to the baseline with Welch's test, cost."""

import math
from dataclasses import dataclass

import numpy as np

from cbam.errors import ConfigError

from .runs import Run
from .stats import Welch, mean_std, welch

COLUMNS = [
    "variant", "seeds (n)", "val top-1 % (mean ± std)", "Δ vs baseline [95% CI]", "p (Welch)",
    "params", "FLOPs", "train img/s", "img/s vs baseline", "epochs",
]  # fmt: skip
CSV_COLUMNS = [
    "variant", "n", "seeds", "val_top1_mean", "val_top1_std", "delta_vs_baseline", "delta_ci95_low",
    "delta_ci95_high", "p_welch", "welch_df", "params", "flops", "train_img_per_s", "train_img_per_s_ratio", "epochs",
]  # fmt: skip
NA = "n/a"


@dataclass
class Variant:
    name: str
    runs: list[Run]
    top1: list[float]  # final-epoch val top-1 of each run
    top1_mean: float
    top1_std: float  # sample std; nan for one run
    diff: float | None  # mean top-1 minus the baseline's; None for the baseline
    test: Welch | None  # None for the baseline, or when either side has one run
    train_img_per_s: float | None  # mean over runs
    train_img_per_s_std: float
    img_per_s_ratio: float | None  # to the baseline's mean
    params: list[int]  # distinct values (one, unless the runs differ in more than attention and seed)
    flops: list[int]
    epochs: list[int]

    @property
    def seeds(self) -> list:
        return [run.summary["seed"] for run in self.runs]


def _distinct(values) -> list:
    return sorted({v for v in values if v is not None})


def summarize(runs: list[Run], baseline: str) -> list[Variant]:
    """Variants in table order: the baseline first, then the others by mean top-1, best first."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)
    if baseline not in groups:
        raise ConfigError(
            f"the baseline variant {baseline!r} is not among the runs ({', '.join(sorted(groups))}): "
            "pass --baseline with one of them"
        )
    base_top1 = [r.top1 for r in groups[baseline]]
    base_rates = [r.summary["train_img_per_s"] for r in groups[baseline] if r.summary.get("train_img_per_s")]
    base_rate = float(np.mean(base_rates)) if base_rates else None
    variants = []
    for name, members in groups.items():
        top1 = [r.top1 for r in members]
        mean, std = mean_std(top1)
        rates = [r.summary["train_img_per_s"] for r in members if r.summary.get("train_img_per_s")]
        rate, rate_std = mean_std(rates) if rates else (None, math.nan)
        is_base = name == baseline
        variants.append(
            Variant(
                name=name,
                runs=members,
                top1=top1,
                top1_mean=mean,
                top1_std=std,
                diff=None if is_base else mean - float(np.mean(base_top1)),
                test=welch(top1, base_top1) if not is_base and len(top1) > 1 and len(base_top1) > 1 else None,
                train_img_per_s=rate,
                train_img_per_s_std=rate_std,
                img_per_s_ratio=rate / base_rate if rate is not None and base_rate else None,
                params=_distinct(r.summary.get("params") for r in members),
                flops=_distinct(r.summary.get("flops") for r in members),
                epochs=_distinct(r.summary.get("epochs") for r in members),
            )
        )
    return sorted(variants, key=lambda v: (v.name != baseline, -v.top1_mean, v.name))


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _p(p: float | None) -> str:
    if p is None:
        return NA
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _flops(f: int) -> str:
    return f"{f / 1e9:.3f} G" if f >= 1e9 else f"{f / 1e6:.1f} M"


def _joined(values: list, fmt) -> str:
    return " / ".join(fmt(v) for v in values) if values else NA


def markdown_row(v: Variant) -> dict:
    std = _finite(v.top1_std)
    test = v.test if v.test is not None and _finite(v.test.p) is not None else None
    if v.diff is None:
        delta, p = "baseline", "-"
    else:
        delta = f"{v.diff:+.2f} " + (f"[{test.ci_low:+.2f}, {test.ci_high:+.2f}]" if test else f"[{NA}]")
        p = _p(test.p if test else None)
    return {
        "variant": v.name,
        "seeds (n)": f"{', '.join(map(str, v.seeds))} ({len(v.runs)})",
        "val top-1 % (mean ± std)": f"{v.top1_mean:.2f} ± " + (f"{std:.2f}" if std is not None else NA),
        "Δ vs baseline [95% CI]": delta,
        "p (Welch)": p,
        "params": _joined(v.params, lambda n: f"{n:,}"),
        "FLOPs": _joined(v.flops, _flops),
        "train img/s": f"{v.train_img_per_s:,.0f}" if v.train_img_per_s is not None else NA,
        "img/s vs baseline": f"{v.img_per_s_ratio:.2f}×" if v.img_per_s_ratio is not None else NA,
        "epochs": _joined(v.epochs, str),
    }


def csv_row(v: Variant) -> dict:
    """Full precision; empty where not defined (the baseline's own difference, n = 1, zero variance)."""
    test = v.test
    return {
        "variant": v.name,
        "n": len(v.runs),
        "seeds": " ".join(map(str, v.seeds)),
        "val_top1_mean": v.top1_mean,
        "val_top1_std": _finite(v.top1_std),
        "delta_vs_baseline": v.diff,
        "delta_ci95_low": _finite(test.ci_low) if test else None,
        "delta_ci95_high": _finite(test.ci_high) if test else None,
        "p_welch": _finite(test.p) if test else None,
        "welch_df": _finite(test.df) if test else None,
        "params": v.params[0] if len(v.params) == 1 else " / ".join(map(str, v.params)),
        "flops": v.flops[0] if len(v.flops) == 1 else " / ".join(map(str, v.flops)),
        "train_img_per_s": v.train_img_per_s,
        "train_img_per_s_ratio": v.img_per_s_ratio,
        "epochs": v.epochs[0] if len(v.epochs) == 1 else " / ".join(map(str, v.epochs)),
    }
