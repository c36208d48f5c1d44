"""`evaluate_checkpoint(cfg)`: val metrics of a saved model, with the config of the run that wrote it."""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cbam.errors import ConfigError, instantiate_config

from .device import autocast_kwargs, resolve_device
from .loop import evaluate
from .records import RunRecords, write_json_atomic
from .restore import restore_run

log = logging.getLogger(__name__)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    if cfg.checkpoint is None:
        raise ConfigError("pass the checkpoint to evaluate: python eval.py checkpoint=outputs/.../best.pt")
    if cfg.batch_size is not None and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise ConfigError(f"batch_size={cfg.batch_size} must be a positive integer, or null for the run's own")
    device = resolve_device(cfg.device)
    run = restore_run(cfg.checkpoint, device=device, data_root=cfg.data_root, eval_batch_size=cfg.batch_size)
    metrics = evaluate(
        run.model,
        run.val_loader,
        device=device,
        num_classes=run.config.data.num_classes,
        autocast=autocast_kwargs(device, run.config.trainer.precision),
        channels_last=run.config.trainer.channels_last,
    )
    per_class = metrics.pop("val/per_class_top1")
    result = {
        "checkpoint": str(run.path),
        "epoch": run.state["epoch"],
        **metrics,
        "val/per_class_top1": dict(zip(run.val_loader.classes, per_class, strict=True)),
        "device": str(device),
    }
    output = Path(cfg.output) if cfg.output else run.path.parent / f"eval-{run.path.stem}.json"
    write_json_atomic(output, result)
    print(json.dumps(result, indent=2))
    log.info("written to %s", output)
    if cfg.wandb:
        _log_to_wandb(run, metrics, output)
    return result


def _log_to_wandb(run, metrics: dict, output: Path) -> None:
    """The metrics as a W&B run (job_type eval) beside the training run: same project and group, the run's
    logger settings (logger=none logs nothing). Its files go to <output's dir>/eval-<checkpoint>/."""
    records = RunRecords(run.path.parent)
    variant = records.read_summary()["variant"] if records.summary.exists() else run.path.parent.name
    title = f"eval-{variant}-s{run.config.seed}"
    run_dir = output.parent / f"eval-{run.path.stem}"
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker_cls = instantiate_config(run.config.logger, "logger")
    config = {"checkpoint": str(run.path), "variant": variant, **OmegaConf.to_container(run.config, resolve=True)}
    with tracker_cls(run_dir=run_dir, name=title, group=run.config.group,
                     tags=["eval", variant], config=config, job_type="eval") as tracker:  # fmt: skip
        tracker.summary(metrics)
