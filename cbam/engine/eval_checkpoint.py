"""`evaluate_checkpoint(cfg)`: val metrics of a saved model, with the config of the run that wrote it."""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from cbam.errors import ConfigError

from .device import autocast_kwargs, resolve_device
from .loop import evaluate
from .records import restore_run, write_json_atomic

log = logging.getLogger(__name__)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    if cfg.checkpoint is None:
        raise ConfigError("pass the checkpoint to evaluate: python eval.py checkpoint=outputs/.../best.pt")
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
    return result
