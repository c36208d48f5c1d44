"""The comparison's figures as PNG files: accuracy per variant, val curves, accuracy vs throughput.

`matplotlib.figure.Figure` draws with the Agg canvas and keeps no global pyplot state.
"""

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from .table import Variant

DPI = 120
BASELINE_COLOR = "black"


def _colors(variants: list[Variant]) -> dict[str, object]:
    """The baseline in black, every other variant its own colour (the same one in every figure)."""
    others = [v.name for v in variants[1:]]
    cmap = colormaps["tab10" if len(others) <= 10 else "tab20"]
    return {variants[0].name: BASELINE_COLOR} | {name: cmap(i % cmap.N) for i, name in enumerate(others)}


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def accuracy_plot(variants: list[Variant], path: Path, accuracy: str) -> Path:
    """One row per variant (the baseline on top): each run's top-1 and the mean with a +-std bar."""
    colors = _colors(variants)
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(variants)))
    ax = fig.subplots()
    for y, v in enumerate(variants):
        ax.scatter(v.top1, [y] * len(v.top1), s=14, facecolors="none", edgecolors="0.55", zorder=2)
        xerr = v.top1_std if np.isfinite(v.top1_std) else None
        ax.errorbar(v.top1_mean, y, xerr=xerr, fmt="o", ms=7, capsize=4, color=colors[v.name], zorder=3)
    ax.axvline(variants[0].top1_mean, color=BASELINE_COLOR, ls="--", lw=1, label=f"baseline ({variants[0].name}) mean")
    ax.scatter([], [], s=14, facecolors="none", edgecolors="0.55", label="one run (seed)")
    ax.set_yticks(range(len(variants)), [v.name for v in variants])
    ax.get_yticklabels()[0].set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel(accuracy)
    ax.set_title("Val top-1 per variant (mean ± std over seeds)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    return _save(fig, path)


def curves_plot(variants: list[Variant], path: Path) -> Path:
    """Val top-1 per epoch: the mean over seeds as a line, the min-max over seeds as a band."""
    colors = _colors(variants)
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for v in variants:
        by_epoch: dict[int, list[float]] = {}
        for run in v.runs:
            for row in run.history:
                by_epoch.setdefault(row["epoch"], []).append(row["val/top1"])
        epochs = sorted(by_epoch)
        x = [e + 1 for e in epochs]  # epochs are counted from 1 on the axis
        values = [np.asarray(by_epoch[e]) for e in epochs]
        base = v is variants[0]
        ax.plot(x, [a.mean() for a in values], marker="o", ms=3, lw=2.2 if base else 1.5, color=colors[v.name],
                label=f"{v.name} (baseline)" if base else v.name)  # fmt: skip
        ax.fill_between(x, [a.min() for a in values], [a.max() for a in values], color=colors[v.name], alpha=0.15, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Val top-1 per epoch (line: mean over seeds, band: min–max)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    return _save(fig, path)


def throughput_plot(variants: list[Variant], path: Path, accuracy: str) -> Path:
    """Mean top-1 against mean training throughput, one labelled point per variant, +-std bars."""
    colors = _colors(variants)
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for v in variants:
        if v.train_img_per_s is None:
            continue
        ax.errorbar(
            v.train_img_per_s,
            v.top1_mean,
            xerr=v.train_img_per_s_std if np.isfinite(v.train_img_per_s_std) else None,
            yerr=v.top1_std if np.isfinite(v.top1_std) else None,
            fmt="s" if v is variants[0] else "o",
            ms=7,
            capsize=3,
            color=colors[v.name],
        )
        ax.annotate(v.name + (" (baseline)" if v is variants[0] else ""), (v.train_img_per_s, v.top1_mean),
                    xytext=(5, 5), textcoords="offset points", fontsize="small")  # fmt: skip
    ax.set_xlabel("training throughput (images/s, mean over seeds)")
    ax.set_ylabel(accuracy)
    ax.set_title("Accuracy vs training throughput (± std over seeds)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def write_plots(variants: list[Variant], out: Path, accuracy: str) -> dict[str, Path]:
    """The three plots; `accuracy` labels the axes of the accuracy compared (the curves are the runs' own)."""
    return {
        "accuracy": accuracy_plot(variants, out / "accuracy.png", accuracy),
        "curves": curves_plot(variants, out / "curves.png"),
        "accuracy_vs_throughput": throughput_plot(variants, out / "accuracy_vs_throughput.png", accuracy),
    }
