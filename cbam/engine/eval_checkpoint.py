"""`evaluate_checkpoint(cfg)`: val metrics of a saved model, with the config of the run that wrote it."""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cbam.data import build_loaders
from cbam.errors import ConfigError
from cbam.models import build_model

from .checkpoint import load_checkpoint, load_model_state
from .loop import evaluate
from .records import write_json_atomic
from .run import PRECISIONS, resolve_device

log = logging.getLogger(__name__)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    if cfg.checkpoint is None:
        raise ConfigError("pass the checkpoint to evaluate: python eval.py checkpoint=outputs/.../best.pt")
    path = Path(cfg.checkpoint)
    state = load_checkpoint(path)
    run_config = path.parent / "config.yaml"
    # The run dir's config.yaml; a checkpoint copied elsewhere carries the same resolved config.
    run_cfg = OmegaConf.load(run_config) if run_config.exists() else OmegaConf.create(state["config"])
    if cfg.batch_size is not None:
        run_cfg.data.eval_batch_size = cfg.batch_size
    if cfg.data_root is not None:
        run_cfg.data.source.root = cfg.data_root

    device = resolve_device(cfg.device)
    model = build_model(run_cfg).to(device)
    load_model_state(model, state["model"], str(path))
    _, val_loader = build_loaders(run_cfg.data, device=device, seed=run_cfg.seed)
    precision = PRECISIONS[run_cfg.trainer.precision]
    metrics = evaluate(
        model,
        val_loader,
        device=device,
        num_classes=run_cfg.data.num_classes,
        autocast={"device_type": device.type, "dtype": precision, "enabled": precision != PRECISIONS["fp32"]},
        channels_last=run_cfg.trainer.channels_last,
    )
    per_class = metrics.pop("val/per_class_top1")
    result = {
        "checkpoint": str(path),
        "epoch": state["epoch"],
        **metrics,
        "val/per_class_top1": dict(zip(val_loader.classes, per_class, strict=True)),
        "device": str(device),
    }
    output = Path(cfg.output) if cfg.output else path.parent / f"eval-{path.stem}.json"
    write_json_atomic(output, result)
    print(json.dumps(result, indent=2))
    log.info("written to %s", output)
    return result
