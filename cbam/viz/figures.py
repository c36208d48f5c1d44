"""The two figures, as PNG files: the attention grid (after the paper's Figure 4) and the channel weights.

`matplotlib.figure.Figure` draws with the Agg canvas and keeps no global pyplot state.
"""

import textwrap
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .panel import Panel

DPI = 120
CELL = 1.45  # inches per image in the grid
OVERLAY = dict(cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")
MAX_VIOLIN_POINTS = 20_000  # a seeded subsample above this: the KDE's cost grows with the points, its shape does not


def display_images(images: torch.Tensor) -> np.ndarray:
    """Normalised (N, C, H, W) tensors as pictures: each image stretched to [0, 1] on its own (which undoes
    any per-channel normalisation's shift and scale). (N, H, W) grey for 1 channel, (N, H, W, 3) for 3."""
    x = images.detach().float().cpu()
    lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-12)).numpy()
    return x.transpose(0, 2, 3, 1) if x.shape[1] == 3 else x.mean(1)


def _label(ax, text: str, color: str = "white") -> None:
    ax.text(0.03, 0.03, text, transform=ax.transAxes, fontsize=6.5, color=color, va="bottom", ha="left",
            bbox=dict(facecolor="black", alpha=0.6, pad=1.5, lw=0))  # fmt: skip


def _show(ax, picture: np.ndarray, overlay: np.ndarray | None = None, dim: bool = False) -> None:
    ax.imshow(picture, cmap="gray", vmin=0, vmax=1, alpha=0.35 if dim else 1.0)
    if overlay is not None:
        ax.imshow(overlay, **OVERLAY)
    ax.set_xticks([])
    ax.set_yticks([])


def _spatial_columns(panel: Panel) -> list[str | None]:
    """The blocks that get a column; a model with no spatial gate in any of them gets one column (None)."""
    return panel.blocks if any(panel.spatial[b] is not None for b in panel.blocks) else [None]


def attention_grid(
    images: torch.Tensor, labels: torch.Tensor, class_names: list[str], panels: list[Panel], path: Path, *, target: str
) -> Path:
    """Rows: the images. Columns: the image, then per model its blocks' spatial maps Ms and the last
    stage's Grad-CAM, each over the image."""
    pictures = display_images(images)
    columns = [("image", None, None)]
    for panel in panels:
        columns += [("spatial", panel, b) for b in _spatial_columns(panel)] + [("cam", panel, None)]
    n_rows, n_cols = len(pictures), len(columns)
    explained = "true" if target == "label" else "predicted"
    note = textwrap.fill(
        "Colours from blue 0 to red 1. Ms: a block's spatial attention (the sigmoid's output, its range printed). "
        f"Grad-CAM: the last stage, for the {explained} class, divided by its maximum. "
        "Under each Grad-CAM the predicted class and its softmax probability: green right, red wrong.",
        width=max(int(CELL * n_cols * 15), 60),  # about 15 characters per inch at 7 pt
    )
    header, footer = 0.85, 0.2 + 0.13 * (note.count("\n") + 1)  # inches
    fig = Figure(figsize=(CELL * n_cols, CELL * n_rows + header + footer))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    height = fig.get_figheight()
    fig.subplots_adjust(
        left=0.01, right=0.99, top=1 - header / height, bottom=footer / height, wspace=0.04, hspace=0.04
    )
    for row, picture in enumerate(pictures):
        true = int(labels[row])
        for col, (kind, panel, block) in enumerate(columns):
            ax = axes[row, col]
            if kind == "image":
                _show(ax, picture)
                _label(ax, f"true: {class_names[true]}")
                title = "image"
            elif kind == "spatial":
                ms = panel.spatial[block] if block is not None else None
                if ms is None:
                    _show(ax, picture, dim=True)
                    ax.text(0.5, 0.5, "no spatial\ngate", transform=ax.transAxes, ha="center", va="center", fontsize=8)
                else:
                    _show(ax, picture, ms[row])  # on the gate's own 0-1 scale: comparable across columns
                    _label(ax, f"Ms {ms[row].min():.2f}–{ms[row].max():.2f}")
                title = f"{block}: Ms" if block is not None else "Ms"
            else:
                _show(ax, picture, panel.cam[row])
                pred = int(panel.predicted[row])
                ok = pred == true
                _label(ax, f"{class_names[pred]} {panel.probs[row, pred]:.2f}", "#7CFC00" if ok else "#FF6060")
                title = "Grad-CAM (label)" if target == "label" else "Grad-CAM"
            if row == 0:
                ax.set_title(title, fontsize=8)
    # One heading over each model's columns, and a thin rule under it.
    start = 1
    for panel in panels:
        stop = start + len(_spatial_columns(panel)) + 1
        left, right = axes[0, start].get_position(), axes[0, stop - 1].get_position()
        y = right.y1 + 0.45 / height
        fig.text((left.x0 + right.x1) / 2, y, panel.title, ha="center", va="bottom", fontsize=10, fontweight="bold")
        x, rule = [left.x0 + 0.005, right.x1 - 0.005], y - 0.04 / height
        fig.add_artist(Line2D(x, [rule, rule], transform=fig.transFigure, color="0.3", lw=0.8))
        start = stop
    fig.text(0.01, 0.05 / height, note, fontsize=7, va="bottom")
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def channel_weights_plot(panels: list[Panel], path: Path) -> Path:
    """One axis per stage; in each, one violin per model of every channel weight Mc of that stage's blocks."""
    stages = list(dict.fromkeys(s for p in panels for s in p.channel))
    colors = colormaps["tab10"]
    fig = Figure(figsize=(max(3.2 * len(stages), 6), 4.2))
    axes = fig.subplots(1, len(stages), sharey=True, squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, stage in zip(axes, stages, strict=True):
        for i, panel in enumerate(panels):
            values = panel.channel.get(stage)
            if values is None:
                ax.text(i, 0.5, "no channel\ngate", ha="center", va="center", fontsize=7, color="0.4")
                continue
            if len(values) > MAX_VIOLIN_POINTS:
                values = rng.choice(values, MAX_VIOLIN_POINTS, replace=False)
            if np.ptp(values) < 1e-6:  # a KDE of one value is singular: a bar marks it instead
                ax.hlines(values[0], i - 0.3, i + 0.3, color=colors(i % 10), lw=2)
                continue
            parts = ax.violinplot([values], positions=[i], widths=0.8, showmedians=True, showextrema=True)
            for body in parts["bodies"]:
                body.set_facecolor(colors(i % 10))
                body.set_edgecolor(colors(i % 10))
                body.set_alpha(0.55)
            for key in ("cmedians", "cmins", "cmaxes", "cbars"):
                parts[key].set_color(colors(i % 10))
        ax.set_xticks(range(len(panels)), [p.title for p in panels], rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(panels) - 0.4)
        ax.set_title(stage, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("channel weight Mc (sigmoid)")
    n = sorted({p.channel_images for p in panels})
    fig.suptitle(
        f"Channel attention weights per stage: every channel of every block, over {'/'.join(map(str, n))} val images "
        "(line: median)",
        fontsize=10,
    )
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path
