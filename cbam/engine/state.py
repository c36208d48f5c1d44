"""What a training run carries from step to step, and therefore what a checkpoint holds."""

import math
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from cbam.errors import ConfigError

from . import distributed as dist
from .checkpoint import load_model_state
from .device import rng_state, set_rng_state
from .optim import start_at


@dataclass
class EpochMeter:
    """Running sums of one epoch, kept on the device so steps need no host sync; part of the
    checkpoint so a run resumed mid-epoch reports the same epoch metrics."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: int = 0
    steps: int = 0
    nonfinite: int = 0
    timing: dict = field(default_factory=lambda: {"wait": 0.0, "elapsed": 0.0, "timed_images": 0, "timed": 0.0})


@dataclass
class TrainState:
    """The model and everything that updates it, with the run's counters.

    `epoch` is the epoch in progress (or next to start); `meter` its partial sums, so a checkpoint written
    mid-epoch resumes to the same epoch metrics. `state_dict()` is exactly what last.pt and best.pt hold.
    """

    model: nn.Module  # the plain module (not compiled, not DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: nn.Module | None  # timm.utils.ModelEmaV3
    config: dict  # the resolved run config, so a checkpoint copied elsewhere still says what it is
    steps_per_epoch: int  # this process's optimizer steps in an epoch (the schedule counts in them)
    epoch: int = 0
    global_step: int = 0
    meter: EpochMeter = field(default_factory=EpochMeter)
    best_top1: float = -math.inf
    best_epoch: int | None = None
    wandb_id: str | None = None
    # how the run shows in W&B ({"group", "variant", "attention_preset"}): eval.py's run of a checkpoint joins it
    wandb_labels: dict = field(default_factory=dict)

    @property
    def eval_model(self) -> nn.Module:
        """The weights the run evaluates (and best.pt is chosen by): the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "meter": asdict(self.meter),
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "wandb_id": self.wandb_id,
            "wandb_labels": self.wandb_labels,
            "world_size": dist.world_size(),  # a mid-epoch checkpoint resumes with as many processes
            "steps_per_epoch": self.steps_per_epoch,  # ... and as many steps in an epoch
            "config": self.config,
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        if state["meter"]["steps"] and state.get("world_size", 1) != dist.world_size():
            raise ConfigError(
                f"{source} was written mid-epoch by {state.get('world_size', 1)} process(es), and each "
                f"process's share of an epoch depends on their number: resume it with as many, not {dist.world_size()}"
            )
        # the steps an epoch can match with another batch size (128 images in 4 batches of 32 or of 31), whose
        # positions in the epoch's order differ: both must
        batches = (state["config"]["data"]["batch_size"], state.get("steps_per_epoch", self.steps_per_epoch))
        own = (self.config["data"]["batch_size"], self.steps_per_epoch)
        if state["meter"]["steps"] and batches != own:
            raise ConfigError(
                f"{source} was written mid-epoch with batches of {batches[0]}, {batches[1]} steps an epoch, and this "
                f"run has batches of {own[0]}, {own[1]} steps: resume it with the data.batch_size it trained with, "
                "or from an epoch's end"
            )
        load_model_state(self.model, state["model"], source)
        # The checkpoint's moments, this run's hyperparameters: load_state_dict would also restore the old
        # run's weight decay, momentum and schedule bounds, which a run started from it may have changed.
        hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(self.optimizer.param_groups, hyperparameters, strict=True):
            group.update(own)
        if state["scaler"]:  # empty from a run without fp16: a run resumed in fp16 starts the scale afresh
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_top1, self.best_epoch, self.wandb_id = state["best_top1"], state["best_epoch"], state["wandb_id"]
        self.meter = EpochMeter(**state["meter"])
        start_at(self.scheduler, self.epoch * self.steps_per_epoch + self.meter.steps)
        if dist.rank() != 0:  # rank 0's meter holds the sums of every rank (see gather_meter)
            self.meter = replace(self.meter, loss_sum=0.0, correct=0.0, count=0)

    def gather_meter(self) -> None:
        """Before a mid-epoch checkpoint: rank 0's meter takes the partial sums of all ranks, so that the
        epoch's all-reduce after resuming counts each sample once."""
        m = self.meter
        sums = dist.all_reduce_sum(torch.tensor([m.loss_sum, m.correct, m.count], dtype=torch.float64))
        self.meter = replace(m, loss_sum=sums[0].item(), correct=sums[1].item(), count=int(sums[2].item()))
