"""`train(cfg, context)`: one training run, from a composed config to its records.

The engine reads no Hydra state: whoever launches a run (train.py, through `cbam.cli`) says in a
`RunContext` where its records go and which presets and overrides it was composed from.
"""

import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cbam.data import Loader, build_loaders
from cbam.errors import CbamError, ConfigError, Diverged, Preempted, RunInProgress, construct, instantiate_config
from cbam.models import build_model, count_flops, count_params
from cbam.tracking import NullTracker

from . import distributed as dist
from .checkpoint import load_checkpoint, save_checkpoint
from .device import (
    FastPath,
    autocast_kwargs,
    choose_fast_path,
    configure_cuda,
    device_name,
    native_bf16,
    peak_memory_mb,
    resolve_device,
    seed_everything,
    with_fast_path,
)
from .loop import StepParts, epoch_train_metrics, evaluate, train_one_epoch
from .optim import build_optimizer
from .records import RunRecords, git_commit
from .state import EpochMeter, TrainState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """What a run needs from whoever launched it, besides its config."""

    run_dir: Path  # where its records go
    choices: Mapping[str, str]  # the presets it was composed from: {"attention": "cbam", "model": ..., "data": ...}
    overrides: Sequence[str] = ()  # the command line's overrides, recorded in summary.json
    group: str | None = None  # the W&B group when cfg.group is null (train.py: a multirun's sweep dir name)
    job: int | None = None  # the job's number in a multirun: trainer.device=auto/cuda uses GPU job mod GPUs

    @property
    def variant(self) -> str:
        return variant_label(self.choices["attention"], self.overrides)


def variant_label(preset: str, overrides: Sequence[str]) -> str:
    """The attention preset, plus any attention.* overrides given on top of it: `cbam+arrangement=parallel`
    (also as `+attention.x=v` or `++attention.x=v`; a deletion `~attention.x` as `~x`)."""
    extra = []
    for override in overrides:
        deleted = override.startswith("~")
        key = override.lstrip("+~")
        if key.startswith("attention."):
            extra.append(("~" if deleted else "") + key.split(".", 1)[1])
    return "+".join([preset, *sorted(extra)])


@dataclass
class FinishedRun:
    """What an end-of-run hook gets: the model as evaluated, its val data, and where to put things."""

    model: nn.Module
    val_loader: Loader
    records: RunRecords
    title: str
    tracker: object  # cbam.tracking's WandbTracker or NullTracker, still open
    step: int


EndOfRunHook = Callable[[FinishedRun], None]


def validate(cfg: DictConfig) -> None:
    for key in ("trainer.epochs", "data.batch_size", "data.eval_batch_size"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    if cfg.trainer.log_every_n_steps < 1:
        raise ConfigError(f"trainer.log_every_n_steps={cfg.trainer.log_every_n_steps} must be >= 1")
    mixup = cfg.trainer.mixup
    if (mixup.mixup_alpha > 0 or mixup.cutmix_alpha > 0) and cfg.data.batch_size % 2:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is odd, and timm's Mixup mixes a batch with itself reversed, "
            "in pairs: use an even data.batch_size with trainer.mixup"
        )
    if cfg.trainer.sync_bn and cfg.trainer.compile is True:
        raise ConfigError(
            "trainer.sync_bn=true with trainer.compile=true: torch.compile breaks its graph at every "
            "SyncBatchNorm (pytorch/pytorch#161302), which costs more than compiling gains; use one of the two"
        )


@contextmanager
def stop_on_signals(second_kills: bool = True):
    """SIGTERM (SLURM preemption) and SIGINT (Ctrl-C) set a flag; the loop finishes its step, writes
    last.pt and stops. A second signal of either kind falls back to the default (immediate) action,
    unless `second_kills` is off: under torchrun a worker gets the same signal twice (from the terminal
    or SLURM, and passed on by torchrun), and torchrun kills workers still running 30 s later itself."""
    requested = []

    def handler(signum, frame):
        if not requested:
            log.warning("%s received: finishing this step, then writing last.pt", signal.Signals(signum).name)
        requested.append(signum)
        if second_kills:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, previous[sig])

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def train(cfg: DictConfig, context: RunContext, end_of_run: Sequence[EndOfRunHook] = ()) -> dict:
    """One run; under torchrun, this process's rank of it. Returns its summary (summary.json).

    end_of_run: called with the finished run before its W&B run closes; `trainer.visualize=true` needs
    `cbam.viz.end_of_run_figures` among them (train.py adds it).

    Nothing is written into the run dir until the run is set up (config valid, checkpoint loaded, data
    read, model built): a command that fails before that leaves every run dir as it was. Only train.lock
    is there while the command runs (RunRecords.claimed), and gone after it.
    """
    validate(cfg)
    if cfg.trainer.visualize and not end_of_run:
        raise ConfigError(
            "trainer.visualize=true: pass end_of_run=[cbam.viz.end_of_run_figures] to train() (train.py does)"
        )
    device = resolve_device(cfg.trainer.device, job=context.job)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        configure_cuda()
        torch.cuda.reset_peak_memory_stats(device)  # the jobs of a multirun share this process: each its own peak
    # Each run starts from a clean compile state: the jobs of one multirun run in one process and would
    # otherwise share dynamo's recompile budget (8 entries), past which it quietly runs eager.
    torch._dynamo.reset()
    dist.join_process_group(device)
    try:
        # Rank 0's dir for every rank: each resolved its own ${now:} (and cbam.cli gave ranks > 0 a throwaway one).
        records = RunRecords(dist.broadcast_object(str(context.run_dir)))
        # Held before anything is read there: two commands pointed at one dir (the same sweep continued on two
        # machines, or one command started twice) would otherwise both train the run, each over the other.
        with records.claimed(enabled=dist.rank() == 0) as holder:
            if (holder := dist.broadcast_object(holder)) is not None:
                raise RunInProgress(
                    f"{records.dir} is being trained by another process ({holder}): this command leaves it to "
                    "that one; to take it over, stop that one (SIGTERM writes last.pt) and run this with resume=auto"
                )
            return _train_held(cfg, context, device, records, end_of_run)
    except (Preempted, Diverged) as e:
        # Every rank raised it after the same step: wait until all are done (rank 0 writing last.pt and
        # finishing W&B), since torchrun stops the others as soon as one process exits. Not after the run
        # finished: the other ranks may have returned already, and rank 0 would wait for them alone.
        if not (isinstance(e, Preempted) and e.run_finished):
            dist.barrier()
        raise


def _train_held(
    cfg: DictConfig, context: RunContext, device: torch.device, records: RunRecords, end_of_run: Sequence[EndOfRunHook]
) -> dict:
    """The run in `records.dir`, which this process holds."""
    if cfg.resume == "auto":
        records.refuse_another_run(cfg)
    resume_path = records.checkpoint_to_resume(cfg.resume)
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    # A finished run is left alone, also without last.pt: a sweep continued from the records committed
    # under results/ skips the runs they hold.
    finished = cfg.resume == "auto" or (checkpoint is not None and checkpoint["epoch"] >= cfg.trainer.epochs)
    if finished and records.finished(cfg.trainer.epochs):
        log.info("%s already finished all %d epochs; nothing to do", records.dir, cfg.trainer.epochs)
        return records.read_summary()
    if cfg.resume == "auto" and resume_path is None and records.summary.exists():
        raise ConfigError(
            f"{records.dir} holds a finished run's records without its last.pt (as under results/): it cannot "
            f"train on to trainer.epochs={cfg.trainer.epochs}, and resume=auto does not start it again over "
            "its records; train into another hydra.sweep.dir or hydra.run.dir"
        )
    forked = resume_path is not None and not records.holds(resume_path)  # another run's checkpoint
    if forked and checkpoint["epoch"] >= cfg.trainer.epochs:
        raise ConfigError(
            f"{resume_path} has finished all {checkpoint['epoch']} epochs: nothing is left to train in "
            f"{records.dir}; pass trainer.epochs={checkpoint['epoch'] + 1} or more to train it further"
        )
    fast = choose_fast_path(cfg.trainer, device, recorded=checkpoint["config"]["trainer"] if checkpoint else None)
    cfg = with_fast_path(cfg, fast)
    run = set_up(cfg, device, checkpoint, str(resume_path), fast)
    if forked:  # a run of its own, in W&B too: the run it started from keeps its W&B run as it was
        run.state.wandb_id = None
        run.state.best_top1, run.state.best_epoch = -math.inf, None  # its best is among its own epochs
    main_process = dist.rank() == 0
    if main_process:
        at_epoch_end = checkpoint is not None and not forked and checkpoint["meter"]["steps"] == 0
        if at_epoch_end and checkpoint["best_epoch"] == checkpoint["epoch"] - 1:
            # Its last epoch was the best, and a kill between the two writes would have left best.pt an
            # epoch behind: this is the state best.pt holds (the same bytes when it does).
            save_checkpoint(checkpoint, records.best)
    with records.logging_to_file(enabled=main_process):
        if dist.is_distributed():
            log.info("rank %d of %d on %s (%s)", dist.rank(), dist.world_size(), device, dist.backend())
        log.info(
            "trainer: %s, %s, %s%s", fast.precision, "channels_last" if fast.channels_last else "NCHW",
            "compiled" if fast.compile else "eager",
            "".join(f"; {k}=auto: {why}" for k, why in fast.chosen.items()),
        )  # fmt: skip
        if fast.precision == "bf16" and not native_bf16(device):
            log.warning(
                "trainer.precision=bf16 on a %s without native bf16 is emulated: steps measured 7-11x slower "
                "than fp32 on an AVX2 CPU (README, Speed); trainer.precision=auto picks what this device runs fast",
                device.type,
            )
        if checkpoint is not None:
            log.info(
                "resumed from %s at epoch %d, step %d of %d",
                resume_path, run.state.epoch, run.state.meter.steps, len(run.train_loader),
            )  # fmt: skip
        elif cfg.resume == "auto":
            log.info("resume=auto: no last.pt in %s, starting from scratch", records.dir)
        try:
            return _train(cfg, context, run, records, end_of_run, resumed=checkpoint is not None)
        except CbamError as e:
            e.report(log)  # into train.log too, while it is open
            raise


@dataclass
class SetUp:
    """A run ready to train: its data, its state (resumed when there was a checkpoint), how steps run."""

    device: torch.device
    train_loader: Loader
    val_loader: Loader
    state: TrainState
    parts: StepParts
    cost: dict  # {"params", "flops"} of the model
    resolved: dict  # the resolved config, as recorded
    fast: FastPath  # trainer.precision, channels_last, compile as chosen


def set_up(cfg: DictConfig, device: torch.device, checkpoint: dict | None, source: str, fast: FastPath) -> SetUp:
    seed_everything(cfg.seed)
    train_loader, val_loader = build_loaders(
        cfg.data, device=device, seed=cfg.seed, rank=dist.rank(), world_size=dist.world_size()
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    state, cost = build_state(cfg, device, steps_per_epoch=len(train_loader), resolved=resolved)
    if checkpoint is not None:
        state.load_state_dict(checkpoint, source)
    parts = step_parts(cfg, state, device)
    return SetUp(device, train_loader, val_loader, state, parts, cost, resolved, fast)


def _train(
    cfg: DictConfig,
    context: RunContext,
    run: SetUp,
    records: RunRecords,
    end_of_run: Sequence[EndOfRunHook],
    resumed: bool,
) -> dict:
    state = run.state
    main_process = dist.rank() == 0
    if main_process:
        records.write_config(run.resolved)
        records.keep_epochs_before(state.epoch)  # rows past the checkpoint are run again
    dist.barrier()  # the other ranks read metrics.jsonl below only once rank 0 has rewritten it
    history = records.read_metrics() if resumed else []
    tracker_cls = instantiate_config(cfg.logger, "logger") if main_process else NullTracker
    title = f"{context.variant}-s{cfg.seed}"
    # W&B groups runs by config keys: the variant (as compare.py groups) and the preset, at the top
    labels = {"variant": context.variant, "attention_preset": context.choices["attention"]}
    state.wandb_labels = {"group": cfg.group if cfg.group is not None else context.group, **labels}
    run_start = time.perf_counter()
    with (
        tracker_cls(
            run_dir=records.dir,
            name=title,
            group=state.wandb_labels["group"],
            tags=[context.variant, context.choices["model"], context.choices["data"], *cfg.tags],
            config={**labels, **run.resolved},
            run_id=state.wandb_id,
        ) as tracker,
        stop_on_signals(second_kills=not dist.is_distributed()) as should_stop,
    ):
        state.wandb_id = tracker.run_id
        per_class = _epochs(cfg, run, records, history, tracker, should_stop)
        wall_time = time.perf_counter() - run_start
        summary = _summary(cfg, context, run, history, per_class, records, tracker.run_id, wall_time)
        if main_process:
            records.write_summary(summary)
            tracker.summary(
                {k: summary[k] for k in ("best_val_top1", "train_img_per_s", "eval_img_per_s", "params", "flops")}
                | {"peak_memory_mb": summary["peak_memory_mb"]}
            )
            finished = FinishedRun(state.eval_model, run.val_loader, records, title, tracker, state.global_step)
            for hook in end_of_run:
                hook(finished)
    log.info("best val top1 %.2f at epoch %d; records in %s", state.best_top1, state.best_epoch + 1, records.dir)
    # A stop signal after the last step (during the final evaluation, the summary): the run is finished, and
    # what would follow it (the next job of a multirun) must not start. No collective here: rank 0 may still
    # be finishing W&B; torchrun passes the signal to every worker, and ends the others when one exits.
    if should_stop():
        raise Preempted(
            f"stopped after the last step of {records.dir}, which is finished: resume with resume=auto",
            run_finished=True,
        )
    return summary


def build_state(cfg: DictConfig, device: torch.device, *, steps_per_epoch: int, resolved: dict) -> tuple:
    """The run's TrainState at step 0, and the model's cost ({"params", "flops"}) before any wrapping."""
    model = build_model(cfg).to(device)
    cost = {"params": count_params(model), "flops": count_flops(model, cfg.data.in_chans, cfg.data.image_size)}
    if cfg.trainer.sync_bn and dist.is_distributed():
        model = dist.convert_sync_batchnorm(model, device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = instantiate_config(cfg.optim.scheduler, "optim.scheduler")(
        optimizer, steps_per_epoch=steps_per_epoch, epochs=cfg.trainer.epochs
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.trainer.precision == "fp16")
    ema = None
    if cfg.trainer.ema_decay:
        from timm.utils import ModelEmaV3  # timm loads its model zoo on import (~1 s): only for the recipes that use it

        ema = construct("trainer.ema_decay", ModelEmaV3, model, decay=cfg.trainer.ema_decay)
    return TrainState(model, optimizer, scheduler, scaler, ema, config=resolved, steps_per_epoch=steps_per_epoch), cost


def step_parts(cfg: DictConfig, state: TrainState, device: torch.device) -> StepParts:
    """How this run's steps run: the model wrapped for DDP and compile, the loss, the numerics."""
    mixup = None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    if cfg.trainer.mixup.mixup_alpha > 0 or cfg.trainer.mixup.cutmix_alpha > 0:
        from timm.data import Mixup  # as ModelEmaV3 in build_state: timm only where a recipe uses it
        from timm.loss import SoftTargetCrossEntropy

        mixup = construct(
            "trainer.mixup", Mixup, **cfg.trainer.mixup, label_smoothing=cfg.optim.label_smoothing,
            num_classes=cfg.data.num_classes,
        )  # fmt: skip
        criterion = SoftTargetCrossEntropy()
    step_model = state.model
    if dist.is_distributed():
        step_model = nn.parallel.DistributedDataParallel(
            step_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # the gradients are views of the all-reduce buckets: no copy either way
            static_graph=True,  # every step uses every parameter: DDP can fix its buckets after the first
        )
    if cfg.trainer.compile:
        step_model = torch.compile(step_model)
    return StepParts(
        model=step_model,
        criterion=criterion,
        autocast=autocast_kwargs(device, cfg.trainer.precision),
        channels_last=cfg.trainer.channels_last,
        grad_clip=cfg.trainer.grad_clip,
        mixup=mixup,
        log_every=cfg.trainer.log_every_n_steps,
        max_nonfinite=cfg.trainer.max_nonfinite_steps,
    )


def _epochs(cfg: DictConfig, run: SetUp, records: RunRecords, history: list, tracker, should_stop) -> list | None:
    """The epochs from `state.epoch` on: train, evaluate, record, checkpoint. Returns the last epoch's
    per-class val top-1. Raises Preempted (after writing last.pt) when a stop signal arrived."""
    state, parts, device, val_loader = run.state, run.parts, run.device, run.val_loader
    main_process = dist.rank() == 0
    epochs = cfg.trainer.epochs
    plain_progress = not sys.stdout.isatty()  # logs and batch jobs get lines instead of a bar

    def on_step_log(metrics: dict, step: int) -> None:
        tracker.log(metrics, step=step)
        if plain_progress:
            log.info("step %d: loss %.4f, lr %.4g", step, metrics["train/step_loss"], metrics["lr"])

    per_class = None  # stays None only for a run resumed after its last epoch, before its summary
    while state.epoch < epochs:
        epoch = state.epoch
        finished = train_one_epoch(
            parts, state, run.train_loader, device=device, on_step_log=on_step_log, should_stop=should_stop
        )
        if not finished:
            state.gather_meter()
            if main_process:
                save_checkpoint(state.state_dict(), records.last)
            raise Preempted(
                f"stopped at epoch {epoch}, step {state.meter.steps}; last.pt written: resume with resume=auto"
            )
        row = {"epoch": epoch, "step": state.global_step, "lr": state.optimizer.param_groups[0]["lr"]}
        row |= epoch_train_metrics(state.meter)
        dist.broadcast_buffers(state.eval_model)
        val = evaluate(
            state.eval_model, val_loader, device=device, num_classes=cfg.data.num_classes,
            autocast=parts.autocast, channels_last=parts.channels_last,
        )  # fmt: skip
        per_class = val.pop("val/per_class_top1")
        row |= val
        is_best = row["val/top1"] > state.best_top1
        if is_best:
            state.best_top1, state.best_epoch = row["val/top1"], epoch
        state.epoch, state.meter = epoch + 1, EpochMeter()
        history.append(row)
        log.info(
            "epoch %d/%d  train loss %.4f top1 %.2f | val loss %.4f top1 %.2f top5 %.2f | "
            "%.0f img/s, data wait %.1f%%, %.1f s",
            epoch + 1, epochs, row["train/loss"], row["train/top1"], row["val/loss"], row["val/top1"],
            row["val/top5"], row["train/img_per_s"], 100 * row["train/data_wait_share"], row["train/epoch_time_s"],
        )  # fmt: skip
        if main_process:
            records.append_metrics(row)
            records.summary.unlink(missing_ok=True)  # a finished run trained on is finished again at its end
            tracker.log(row, step=state.global_step)
            checkpoint = state.state_dict()
            save_checkpoint(checkpoint, records.last)  # first: on a full disk the resume point is what fits
            if is_best:
                save_checkpoint(checkpoint, records.best)
        dist.barrier()  # rank 0's checkpoints are complete before any rank goes on (or exits)
    return per_class


def _summary(cfg, context: RunContext, run: SetUp, history, per_class, records, wandb_id, wall_time_s) -> dict:
    state, cost, device = run.state, run.cost, run.device
    peak_mb, peak_kind = peak_memory_mb(device)
    final = history[-1]
    train_rates = [r["train/img_per_s"] for r in history if r["train/img_per_s"] is not None]
    return {
        "variant": context.variant,
        "attention": context.choices["attention"],
        "model": context.choices["model"],
        "data": cfg.data.name,
        "seed": cfg.seed,
        "epochs": cfg.trainer.epochs,
        "final": {k: final[k] for k in ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5")},
        "best_val_top1": state.best_top1,
        "best_epoch": state.best_epoch,
        "val_per_class_top1": per_class,
        "params": cost["params"],
        "flops": cost["flops"],
        "train_img_per_s": sum(train_rates) / len(train_rates) if train_rates else None,
        "eval_img_per_s": final["val/img_per_s"],
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
        "device": device_name(device),
        "fast_path": run.fast.record(),
        "world_size": dist.world_size(),
        "wall_time_s": wall_time_s,
        "git_commit": git_commit(),
        "wandb_run_id": wandb_id,
        "run_dir": str(records.dir),
        "overrides": list(context.overrides),
    }
