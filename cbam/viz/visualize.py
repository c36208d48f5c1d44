"""The figures for saved checkpoints (`scripts/visualize.py`) and for a model at the end of its training run."""

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from cbam.data import Loader
from cbam.engine.checkpoint import load_checkpoint
from cbam.engine.device import resolve_device
from cbam.engine.records import RunRecords, output_dir
from cbam.engine.restore import restore_run, run_config
from cbam.engine.run import FinishedRun
from cbam.errors import ConfigError

from .figures import attention_grid, channel_weights_plot
from .gradcam import TARGETS
from .panel import Panel, choose_images, model_panel, take_images

log = logging.getLogger(__name__)

# The data options that decide which images the val split holds; anything else (batch sizes, workers,
# the root the files were read from) may differ between the checkpoints shown side by side.
VAL_KEYS = ("name", "num_classes", "in_chans", "image_size", "holdout", "source")


def write_figures(
    panels: list[Panel], images, labels, class_names: list[str], out: Path, *, target: str
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    return {
        "attention_grid": attention_grid(
            images, labels, class_names, panels, out / "attention_grid.png", target=target
        ),
        "channel_weights": channel_weights_plot(panels, out / "channel_weights.png"),
    }


def _val_images(loader: Loader, positions: list[int], channel_images: int):
    """(images, labels) at the grid's positions, and the first `channel_images` for the channel weights."""
    images, labels = take_images(loader, positions)
    many, _ = take_images(loader, range(min(channel_images, loader.num_samples)))
    return images, labels, many


def _check_options(num_images: int, channel_images: int, target: str) -> None:
    for key, value in (("num_images", num_images), ("channel_images", channel_images)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    if target not in TARGETS:
        raise ConfigError(f"target={target!r} is unknown: use one of {', '.join(TARGETS)}")


def log_end_of_run(
    model: nn.Module,
    val_loader: Loader,
    run_dir: str | Path,
    *,
    title: str,
    tracker=None,
    step: int | None = None,
    num_images: int = 6,
    blocks: Sequence[str] | None = None,
    target: str = "predicted",
    channel_images: int = 256,
) -> dict[str, Path]:
    """Write `<run_dir>/viz/attention_grid.png` and `channel_weights.png` for a trained model and, when a
    tracker is given, log them with `tracker.log_images({name: path}, step)`; returns {name: path}.

    The model goes to eval mode for this and back to its mode afterwards; its weights and their .grad are
    not touched. Defaults: those of conf/visualize.yaml (a test holds them equal).
    """
    _check_options(num_images, channel_images, target)
    images, labels, many = _val_images(val_loader, choose_images(val_loader, num_images), channel_images)
    panel = model_panel(model, images, labels, many, title=title, blocks=blocks, target=target)
    paths = write_figures([panel], images, labels, list(val_loader.classes), RunRecords(run_dir).viz, target=target)
    if tracker is not None:
        tracker.log_images(paths, step=step)
    return paths


def end_of_run_figures(run: FinishedRun) -> None:
    """trainer.visualize: the figures of the final model, into <run>/viz and W&B. Figures are extras, like
    W&B: a failure warns and the finished run stays finished."""
    try:
        log_end_of_run(run.model, run.val_loader, run.records.dir, title=run.title, tracker=run.tracker, step=run.step)
    except Exception as e:
        log.warning(
            "end-of-run figures failed (%s); make them with scripts/visualize.py checkpoint=%s", e, run.records.best
        )


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_paths(checkpoint) -> list[Path]:
    """`checkpoint=a.pt` or `checkpoint=[a.pt,b.pt]` as a list of paths."""
    if checkpoint is None or (isinstance(checkpoint, ListConfig | list) and not checkpoint):
        raise ConfigError(
            "pass the checkpoint(s) to show: python scripts/visualize.py checkpoint=<run>/best.pt "
            "[checkpoint=<other run>/best.pt ...]"
        )
    items = list(checkpoint) if isinstance(checkpoint, ListConfig | list) else [checkpoint]
    return [Path(str(p)) for p in items]


def _title(path: Path) -> str:
    """The run's variant from its summary.json (e.g. `cbam+arrangement=parallel`); else (a run not
    finished, a checkpoint moved) the run dir's name, or its parent's when the name is only a time."""
    records = RunRecords(path.parent)
    if records.summary.exists():
        try:
            return records.read_summary()["variant"]
        except (ValueError, KeyError):
            pass
    run_dir = path.parent
    return run_dir.parent.name if re.fullmatch(r"[\d_-]+", run_dir.name) else run_dir.name


def _unique(titles: list[str], paths: list[Path], seeds: list[int]) -> list[str]:
    """Titles that tell the checkpoints apart: the seed, then the file name, added only where needed."""
    for extra in (lambda i: f"s{seeds[i]}", lambda i: paths[i].stem, lambda i: f"#{i + 1}"):
        if len(set(titles)) == len(titles):
            break
        clash = {t for t in titles if titles.count(t) > 1}
        titles = [f"{t} {extra(i)}" if t in clash else t for i, t in enumerate(titles)]
    return titles


def _check_same_val_data(paths: list[Path], configs: list[DictConfig]) -> None:
    def val_data(cfg: DictConfig) -> dict:
        data = OmegaConf.to_container(cfg.data, resolve=True)
        data["source"] = {k: v for k, v in data["source"].items() if k != "root"}
        return {k: data.get(k) for k in VAL_KEYS}

    reference = val_data(configs[0])
    for path, cfg in zip(paths[1:], configs[1:], strict=True):
        other = val_data(cfg)
        if other != reference:
            key = next(k for k in VAL_KEYS if other[k] != reference[k])
            raise ConfigError(
                f"the checkpoints were trained on different data ({paths[0]}: data.{key}={reference[key]}, "
                f"{path}: data.{key}={other[key]}): show the checkpoints of one dataset at a time"
            )


def visualize_checkpoints(cfg: DictConfig) -> dict[str, Path]:
    """conf/visualize.yaml's job: the figures for every checkpoint side by side; returns {name: path}."""
    paths = checkpoint_paths(cfg.checkpoint)
    _check_options(cfg.num_images, cfg.channel_images, cfg.target)
    states = [load_checkpoint(p) for p in paths]  # every path checked before any work
    configs = [run_config(p, s) for p, s in zip(paths, states, strict=True)]
    _check_same_val_data(paths, configs)
    titles = _unique([_title(p) for p in paths], paths, [c.seed for c in configs])
    device = resolve_device(cfg.device)
    blocks = list(cfg.blocks) if cfg.blocks is not None else None

    panels, positions = [], None
    for path, state, title in zip(paths, states, titles, strict=True):
        # Each model sees the images normalised as in its own run; the positions are the same for all.
        run = restore_run(path, device=device, data_root=cfg.data_root, state=state)
        if positions is None:
            positions = choose_images(run.val_loader, cfg.num_images)
            class_names = list(run.val_loader.classes)
        images, labels, many = _val_images(run.val_loader, positions, cfg.channel_images)
        try:
            panels.append(model_panel(run.model, images, labels, many, title=title, blocks=blocks, target=cfg.target))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        if len(panels) == 1:
            shown = (images, labels)
        log.info("%s: %s done", title, path)

    out = output_dir(cfg.output if cfg.output is not None else RunRecords(paths[0].parent).viz, "output")
    written = write_figures(panels, *shown, class_names, out, target=cfg.target)
    for p in written.values():
        print(p)
    return written
