"""One row per variant: accuracy over seeds, its difference to the baseline (paired by seed where the runs
share seeds, Welch's otherwise), a verdict over the table's family of comparisons, cost."""

import math
from dataclasses import dataclass

import numpy as np

from cbam.errors import ConfigError

from . import stats
from .runs import Run
from .stats import Test, mean_std

COLUMNS = [
    "variant", "seeds (n)", "val top-1 % (mean ± std)", "Δ vs baseline [95% CI]", "p (Welch)", "Δ paired [95% CI]",
    "p (paired)", "p (Holm)", "verdict", "bootstrap 95% CI", "d", "params", "FLOPs", "train img/s",
    "img/s vs baseline", "epochs",
]  # fmt: skip
CSV_COLUMNS = [
    "variant", "n", "seeds", "val_top1_mean", "val_top1_std", "accuracy", "delta_vs_baseline", "delta_ci95_low",
    "delta_ci95_high", "p_welch", "welch_df", "n_paired", "delta_paired", "ci_low_paired", "ci_high_paired",
    "p_paired", "p_holm", "p_equivalence", "p_equivalence_holm", "verdict", "seeds_needed", "bootstrap_low",
    "bootstrap_high", "effect_size", "params", "flops", "train_img_per_s", "train_img_per_s_ratio", "epochs",
]  # fmt: skip
NA = "n/a"


@dataclass
class Decision:
    """What the table concludes about a variant against the baseline."""

    test: Test | None  # the one decided on: paired where >= 2 seeds are shared, else Welch's
    p_holm: float  # its p, Holm-adjusted over the table's non-baseline rows
    p_equivalence: float  # TOST within +-margin
    p_equivalence_holm: float
    verdict: str  # better | worse | equivalent | undecided
    seeds_needed: int | None  # undecided: seeds per variant that would decide at the observed variance
    bootstrap: tuple[float, float]  # a check of the interval that does not assume normality
    effect_size: float  # Cohen's d (d_z when paired)


@dataclass
class Variant:
    name: str
    runs: list[Run]
    top1: list[float]  # final-epoch val top-1 of each run
    top1_mean: float
    top1_std: float  # sample std; nan for one run
    diff: float | None  # mean top-1 minus the baseline's; None for the baseline
    welch: Test | None  # None for the baseline, or when either side has one run
    paired: Test | None  # over the seeds shared with the baseline; None with fewer than two
    decision: Decision | None  # None for the baseline
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


def _by_seed(runs: list[Run], variant: str) -> dict:
    by_seed = {}
    for run in runs:
        seed = run.summary["seed"]
        if seed in by_seed:
            raise ConfigError(
                f"{variant} has two runs with seed {seed} ({by_seed[seed].dir} and {run.dir}): pass one of them"
            )
        by_seed[seed] = run
    return by_seed


def _shared(members: list[Run], baseline: list[Run], name: str, base_name: str) -> tuple[list[float], list[float]]:
    """The two variants' top-1 at the seeds both have, in seed order."""
    own, base = _by_seed(members, name), _by_seed(baseline, base_name)
    seeds = sorted(set(own) & set(base))
    return [own[s].top1 for s in seeds], [base[s].top1 for s in seeds]


def summarize(runs: list[Run], baseline: str, margin: float = 0.2) -> list[Variant]:
    """Variants in table order: the baseline first, then the others by mean top-1, best first."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.variant, []).append(run)
    if baseline not in groups:
        raise ConfigError(
            f"the baseline variant {baseline!r} is not among the runs ({', '.join(sorted(groups))}): "
            "pass --baseline with one of them"
        )
    base_runs = groups[baseline]
    base_top1 = [r.top1 for r in base_runs]
    base_rates = [r.summary["train_img_per_s"] for r in base_runs if r.summary.get("train_img_per_s")]
    base_rate = float(np.mean(base_rates)) if base_rates else None
    variants = []
    for name, members in groups.items():
        top1 = [r.top1 for r in members]
        mean, std = mean_std(top1)
        rates = [r.summary["train_img_per_s"] for r in members if r.summary.get("train_img_per_s")]
        rate, rate_std = mean_std(rates) if rates else (None, math.nan)
        is_base = name == baseline
        own, base = _shared(members, base_runs, name, baseline) if not is_base else ([], [])
        variants.append(
            Variant(
                name=name,
                runs=members,
                top1=top1,
                top1_mean=mean,
                top1_std=std,
                diff=None if is_base else mean - float(np.mean(base_top1)),
                welch=stats.welch(top1, base_top1) if not is_base and len(top1) > 1 and len(base_top1) > 1 else None,
                paired=stats.paired(own, base) if len(own) > 1 else None,
                decision=None,
                train_img_per_s=rate,
                train_img_per_s_std=rate_std,
                img_per_s_ratio=rate / base_rate if rate is not None and base_rate else None,
                params=_distinct(r.summary.get("params") for r in members),
                flops=_distinct(r.summary.get("flops") for r in members),
                epochs=_distinct(r.summary.get("epochs") for r in members),
            )
        )
    variants = sorted(variants, key=lambda v: (v.name != baseline, -v.top1_mean, v.name))
    decide(variants, groups, margin)
    return variants


def decide(variants: list[Variant], groups: dict[str, list[Run]], margin: float) -> None:
    """Every non-baseline row's Decision: Holm over the rows' p (paired where two or more seeds are shared and
    the per-seed differences vary, else Welch's), TOST within +-margin for equivalence, and for an undecided row the
    seeds that would decide."""
    base = variants[0]
    rows = variants[1:]
    tests = [v.paired if v.paired is not None and math.isfinite(v.paired.p) else v.welch for v in rows]
    p_holm = stats.holm([t.p if t is not None else math.nan for t in tests])
    p_equiv = [stats.tost(t, margin) if t is not None else math.nan for t in tests]
    p_equiv_holm = stats.holm(p_equiv)
    m = sum(math.isfinite(p) for p in p_holm)
    for v, test, ph, pe, peh in zip(rows, tests, p_holm, p_equiv, p_equiv_holm, strict=True):
        if test is None or not math.isfinite(test.p):
            sd = d_sd = math.nan
            boot = (math.nan, math.nan)
        elif test.kind == "paired":
            own, ref = _shared(v.runs, base.runs, v.name, base.name)
            diffs = np.subtract(own, ref)
            sd = d_sd = float(np.std(diffs, ddof=1))
            boot = stats.bootstrap_ci(diffs, None)
        else:
            var, base_var = np.var(v.top1, ddof=1), np.var(base.top1, ddof=1)
            sd = math.sqrt((var + base_var) / 2)  # the planned seeds are as many on each side
            d_sd = stats.pooled_sd(var, len(v.top1), base_var, len(base.top1))
            boot = stats.bootstrap_ci(v.top1, base.top1)
        verdict = stats.verdict(test, ph, peh)
        needed = None
        if verdict == "undecided" and test is not None:
            needed = stats.seeds_needed(test, sd, margin, stats.ALPHA / max(m, 1))  # Bonferroni: Holm's first step
        v.decision = Decision(
            test, ph, pe, peh, verdict, needed, boot, stats.effect_size(test, d_sd) if test else math.nan
        )


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return NA
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _flops(f: int) -> str:
    return f"{f / 1e9:.3f} G" if f >= 1e9 else f"{f / 1e6:.1f} M"


def _joined(values: list, fmt) -> str:
    return " / ".join(fmt(v) for v in values) if values else NA


def _interval(low: float | None, high: float | None) -> str:
    return f"[{low:+.2f}, {high:+.2f}]" if _finite(low) is not None and _finite(high) is not None else f"[{NA}]"


def _verdict(v: Variant, margin: float) -> str:
    d = v.decision
    if d.verdict == "equivalent":
        return f"equivalent (±{margin:g})"
    if d.verdict in ("better", "worse") and stats.within_margin(d.p_equivalence_holm):
        return f"{d.verdict}, within ±{margin:g}"  # a real difference, and one smaller than the margin
    if d.verdict == "undecided":
        if d.seeds_needed:
            return f"undecided: {d.seeds_needed} seeds"
        tested = [t for t in (v.paired, v.welch) if t is not None and _finite(t.p) is not None]
        # No spread yet (one run a side, or equal values): nothing to plan the seeds from.
        return f"undecided: > {stats.MAX_SEEDS} seeds" if tested else "undecided: more seeds"
    return d.verdict


def markdown_row(v: Variant, margin: float) -> dict:
    std = _finite(v.top1_std)
    welch = v.welch if v.welch is not None and _finite(v.welch.p) is not None else None
    paired = v.paired if v.paired is not None and _finite(v.paired.p) is not None else None
    row = {
        "variant": v.name,
        "seeds (n)": f"{', '.join(map(str, sorted(v.seeds)))} ({len(v.runs)})",
        "val top-1 % (mean ± std)": f"{v.top1_mean:.2f} ± " + (f"{std:.2f}" if std is not None else NA),
        "params": _joined(v.params, lambda n: f"{n:,}"),
        "FLOPs": _joined(v.flops, _flops),
        "train img/s": f"{v.train_img_per_s:,.0f}" if v.train_img_per_s is not None else NA,
        "img/s vs baseline": f"{v.img_per_s_ratio:.2f}×" if v.img_per_s_ratio is not None else NA,
        "epochs": _joined(v.epochs, str),
    }
    if v.diff is None:
        return (
            row
            | dict.fromkeys(
                ["Δ paired [95% CI]", "p (Welch)", "p (paired)", "p (Holm)", "verdict", "bootstrap 95% CI", "d"], "-"
            )
            | {"Δ vs baseline [95% CI]": "baseline"}
        )
    d = v.decision
    return row | {
        "Δ vs baseline [95% CI]": f"{v.diff:+.2f} " + (_interval(welch.ci_low, welch.ci_high) if welch else f"[{NA}]"),
        "p (Welch)": _p(welch.p if welch else None),
        "Δ paired [95% CI]": (
            f"{paired.diff:+.2f} {_interval(paired.ci_low, paired.ci_high)} ({paired.n} seeds)" if paired else NA
        ),
        "p (paired)": _p(paired.p if paired else None),
        "p (Holm)": _p(d.p_holm),
        "verdict": _verdict(v, margin),
        "bootstrap 95% CI": _interval(*d.bootstrap),
        "d": f"{d.effect_size:+.2f}" if _finite(d.effect_size) is not None else NA,
    }


def csv_row(v: Variant) -> dict:
    """Full precision; empty where not defined (the baseline's own difference, n = 1, zero variance, no
    shared seeds)."""
    welch, paired, d = v.welch, v.paired, v.decision
    return {
        "variant": v.name,
        "n": len(v.runs),
        "seeds": " ".join(map(str, v.seeds)),
        "val_top1_mean": v.top1_mean,
        "val_top1_std": _finite(v.top1_std),
        # which top-1 the row holds: compare.py --bn-batch-stats's where the runs have it
        "accuracy": "bn_batch_stats" if any(r.evaluated_top1 is not None for r in v.runs) else "final_epoch",
        "delta_vs_baseline": v.diff,
        "delta_ci95_low": _finite(welch.ci_low) if welch else None,
        "delta_ci95_high": _finite(welch.ci_high) if welch else None,
        "p_welch": _finite(welch.p) if welch else None,
        "welch_df": _finite(welch.df) if welch else None,
        "n_paired": paired.n if paired else None,
        "delta_paired": paired.diff if paired else None,
        "ci_low_paired": _finite(paired.ci_low) if paired else None,
        "ci_high_paired": _finite(paired.ci_high) if paired else None,
        "p_paired": _finite(paired.p) if paired else None,
        "p_holm": _finite(d.p_holm) if d else None,
        "p_equivalence": _finite(d.p_equivalence) if d else None,
        "p_equivalence_holm": _finite(d.p_equivalence_holm) if d else None,
        "verdict": d.verdict if d else None,
        "seeds_needed": d.seeds_needed if d else None,
        "bootstrap_low": _finite(d.bootstrap[0]) if d else None,
        "bootstrap_high": _finite(d.bootstrap[1]) if d else None,
        "effect_size": _finite(d.effect_size) if d else None,
        "params": v.params[0] if len(v.params) == 1 else " / ".join(map(str, v.params)),
        "flops": v.flops[0] if len(v.flops) == 1 else " / ".join(map(str, v.flops)),
        "train_img_per_s": v.train_img_per_s,
        "train_img_per_s_ratio": v.img_per_s_ratio,
        "epochs": v.epochs[0] if len(v.epochs) == 1 else " / ".join(map(str, v.epochs)),
    }
