"""A checkpoint brought back as its run had it (eval.py, scripts/visualize.py)."""

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cbam.data import Loader, build_val_loader
from cbam.errors import ConfigError
from cbam.models import build_model

from .checkpoint import load_checkpoint, load_model_state
from .records import RunRecords


@dataclass
class RestoredRun:
    """A checkpoint brought back as its run had it: config, the weights it evaluated, its val data."""

    path: Path  # the checkpoint
    state: dict  # the checkpoint as loaded
    config: DictConfig  # the run's resolved config
    model: nn.Module  # on the device, holding the weights the run evaluated (the EMA's when it had one)
    val_loader: Loader


def run_config(path: Path, state: dict) -> DictConfig:
    """The config of the run that wrote checkpoint `path`: its run dir's config.yaml; a checkpoint copied
    elsewhere carries the same resolved config."""
    config = RunRecords(path.parent).config
    return OmegaConf.load(config) if config.exists() else OmegaConf.create(state["config"])


def evaluated_weights(state: dict) -> dict:
    """The state_dict the run validated and chose best.pt by: the EMA's when the run kept one
    (trainer.ema_decay; timm's ModelEmaV3 keeps the copy under `module.`), else the trained weights."""
    if state.get("ema") is None:
        return state["model"]
    return {k.removeprefix("module."): v for k, v in state["ema"].items()}


def restore_run(
    checkpoint: str | Path,
    *,
    device: torch.device,
    data_root: str | None = None,
    eval_batch_size: int | None = None,
    state: dict | None = None,
) -> RestoredRun:
    """Model and val loader of the run that wrote `checkpoint` (for eval.py and scripts/visualize.py).

    data_root, eval_batch_size: override the run's data.source.root (the data moved) and data.eval_batch_size.
    state: the checkpoint already loaded, to not read it twice.
    """
    path = Path(checkpoint)
    state = load_checkpoint(path) if state is None else state
    cfg = run_config(path, state)
    if data_root is not None:
        if "root" not in cfg.data.source:
            raise ConfigError(f"data_root: {path} was trained on {cfg.data.name}, which reads no files; leave it out")
        cfg.data.source.root = data_root
    if eval_batch_size is not None:
        cfg.data.eval_batch_size = eval_batch_size
    model = build_model(cfg).to(device)
    load_model_state(
        model, evaluated_weights(state), str(path),
        remedy="The config.yaml beside it is another run's: evaluate a checkpoint in its own run dir, or in "
        "a dir without config.yaml (it carries its own config)",
    )  # fmt: skip
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)  # the layout it was evaluated in
    val_loader = build_val_loader(cfg.data, device=device, seed=cfg.seed)
    return RestoredRun(path, state, cfg, model, val_loader)
