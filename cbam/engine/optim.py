"""Optimizer and per-step learning-rate schedules.

Schedules are torch LR schedulers stepped once per optimizer step, built from the epochs and the
loader length, which are only known at run time: the YAML names the shape, the code derives the steps.
"""

import math
import warnings

from omegaconf import DictConfig
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from cbam.errors import ConfigError, instantiate_config


def build_optimizer(optim_cfg: DictConfig, model: nn.Module) -> Optimizer:
    weight_decay = optim_cfg.optimizer.weight_decay
    if optim_cfg.no_decay_norm_and_bias:
        # timm's grouping: 1-D parameters (norm weights, biases) get no weight decay. Imported here: timm loads
        # its model zoo on import (~1 s of every start), and the default SGD recipe does not group.
        from timm.optim import param_groups_weight_decay

        params = param_groups_weight_decay(model, weight_decay)
    else:
        params = model.parameters()
    optimizer = instantiate_config(optim_cfg.optimizer, "optim.optimizer")(params)
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ConfigError(
            f"optim.optimizer: {type(optimizer).__name__} has no fused step, which the training step needs to skip a "
            "non-finite step without a host sync: use a torch optimizer with optim.optimizer.fused=true (SGD, AdamW)"
        )
    return optimizer


def start_at(scheduler: LRScheduler, step: int) -> None:
    """Put a schedule built for this run at optimizer step `step`, with the LR it gives there: how a resumed
    run continues. The old run's scheduler state is not loaded, since it counts in that run's steps, and a run
    resumed with another number of processes (or epochs) has another number of steps per epoch (or in all).
    Every schedule here is a closed form of the step, so this is the LR that `step` calls of step() give."""
    scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # no optimizer step has run in this process yet, and that is intended
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


def _warmup_factor(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


def cosine(
    optimizer: Optimizer, *, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0, min_lr_ratio: float = 0.0
) -> LRScheduler:
    """Linear warmup, then cosine from the base LR down to `min_lr_ratio * base LR` at the last step."""
    total, warmup = steps_per_epoch * epochs, round(steps_per_epoch * warmup_epochs)

    def factor(step: int) -> float:
        if step < warmup:
            return _warmup_factor(step, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)


def multistep(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    epochs: int,
    milestones: list[int],
    gamma: float = 0.1,
    warmup_epochs: float = 0,
) -> LRScheduler:
    """Linear warmup, then the LR times `gamma` at each milestone epoch (the paper's x0.1 every 30 epochs)."""
    warmup = round(steps_per_epoch * warmup_epochs)
    bounds = [m * steps_per_epoch for m in milestones]

    def factor(step: int) -> float:
        return _warmup_factor(step, warmup) * gamma ** sum(step >= b for b in bounds)

    return LambdaLR(optimizer, factor)


def onecycle(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> LRScheduler:
    """torch's one-cycle policy peaking at the optimizer's LR after `warmup_epochs`."""
    if not 0 < warmup_epochs < epochs:
        raise ConfigError(
            f"optim.scheduler.warmup_epochs={warmup_epochs} must be in (0, trainer.epochs={epochs}) for one-cycle"
        )
    return OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=steps_per_epoch * epochs,
        pct_start=warmup_epochs / epochs,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )
