"""`evaluate_checkpoint(cfg)`: val metrics of a saved model, with the config of the run that wrote it."""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from cbam.errors import ConfigError, instantiate_config
from cbam.models import batch_norms_matching

from .checkpoint import load_checkpoint
from .device import autocast_kwargs, resolve_device
from .loop import evaluate
from .records import RunRecords, evaluation_name, write_json_atomic
from .restore import restore_run, run_config

log = logging.getLogger(__name__)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    if cfg.checkpoint is None:
        raise ConfigError("pass the checkpoint to evaluate: python eval.py checkpoint=outputs/.../last.pt")
    if cfg.batch_size is not None and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise ConfigError(f"batch_size={cfg.batch_size} must be a positive integer, or null for the run's own")
    pattern = cfg.bn_batch_stats
    if pattern is not None and (not isinstance(pattern, str) or not pattern):
        raise ConfigError(f"bn_batch_stats={pattern!r} must be a glob of module names, e.g. '*.channel.mlp.*', or null")
    device = resolve_device(cfg.device)
    state = load_checkpoint(cfg.checkpoint)
    batch_size = cfg.batch_size
    if pattern is not None and batch_size is None:
        # batch statistics depend on the batch: by default those of a batch the size the run trained with
        batch_size = run_config(Path(cfg.checkpoint), state).data.batch_size
    run = restore_run(cfg.checkpoint, device=device, data_root=cfg.data_root, eval_batch_size=batch_size, state=state)
    batch_stats = None
    if pattern is not None:
        layers = _use_batch_statistics(run.model, pattern)
        _check_batches(run.val_loader, pattern)
        batch_stats = {"pattern": pattern, "layers": layers, "batch_size": run.val_loader.batch_size}
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
        **({"bn_batch_stats": batch_stats} if batch_stats else {}),
    }
    # the diagnostic's numbers go beside the checkpoint's own evaluation, never over it
    name = evaluation_name(run.path, bn_batch_stats=batch_stats is not None)
    output = Path(cfg.output) if cfg.output else run.path.parent / f"{name}.json"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output, result)
    except OSError as e:
        reason = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        raise ConfigError(f"cannot write {output} ({reason}): pass output=PATH somewhere writable") from e
    print(json.dumps(result, indent=2))
    log.info("written to %s", output)
    if cfg.wandb:
        _log_to_wandb(run, metrics, output.parent / name, batch_stats)
    return result


def _use_batch_statistics(model: nn.Module, pattern: str) -> list[str]:
    """The BatchNorm layers of `model` whose name matches `pattern` normalise with each batch's own
    statistics in eval mode too, as they did in training: without running statistics, PyTorch's BatchNorm
    uses the batch's. Their running statistics are dropped from this in-memory model only. Returns their names."""
    chosen = batch_norms_matching(model, pattern)
    if not chosen:
        norms = batch_norms_matching(model, "*")
        examples = ", ".join(list(norms)[:3]) or "none: the model has no BatchNorm"
        raise ConfigError(
            f"bn_batch_stats={pattern!r} matches none of the model's {len(norms)} BatchNorm layers "
            f"(e.g. {examples}); pass a glob of their names, e.g. '*' for all of them"
        )
    for norm in chosen.values():
        norm.track_running_stats = False
        norm.running_mean = norm.running_var = norm.num_batches_tracked = None
    return list(chosen)


def _check_batches(loader, pattern: str) -> None:
    """Batch statistics of a batch of one are undefined (PyTorch raises mid-evaluation): refuse up front."""
    if loader.batch_size == 1 or loader.num_samples % loader.batch_size == 1:
        raise ConfigError(
            f"bn_batch_stats={pattern!r} needs at least two images in every batch, but batch_size={loader.batch_size} "
            f"leaves a batch of one of the {loader.num_samples} val images: choose another batch_size"
        )


def _log_to_wandb(run, metrics: dict, run_dir: Path, batch_stats: dict | None) -> None:
    """The metrics as a W&B run (job_type eval) beside the training run: same project, group, variant and
    preset, the run's logger settings (logger=none logs nothing). Its files go to run_dir
    (<output's dir>/eval-<checkpoint>/)."""
    labels = dict(run.state.get("wandb_labels") or _labels_of_an_older_checkpoint(run))
    group, variant = labels.pop("group"), labels["variant"]
    title = f"eval-{variant}-s{run.config.seed}" + ("-bn_batch_stats" if batch_stats else "")
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker_cls = instantiate_config(run.config.logger, "logger")
    config = {"checkpoint": str(run.path), **labels, **OmegaConf.to_container(run.config, resolve=True)}
    tags = ["eval", variant]
    if batch_stats:
        config["bn_batch_stats"] = batch_stats
        tags.append("bn_batch_stats")
    with tracker_cls(run_dir=run_dir, name=title, group=group,
                     tags=tags, config=config, job_type="eval") as tracker:  # fmt: skip
        tracker.summary(metrics)


def _labels_of_an_older_checkpoint(run) -> dict:
    """A checkpoint written before checkpoints kept their W&B labels: the variant of the finished run's
    summary, else its dir's name; the group only where the config set one."""
    records = RunRecords(run.path.parent)
    variant = records.read_summary()["variant"] if records.summary.exists() else run.path.parent.name
    return {"group": run.config.group, "variant": variant}
