"""`train(cfg)`: one training run, from a composed config to its records."""

import json
import logging
import random
import resource
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from cbam.data import build_loaders
from cbam.errors import ConfigError, Diverged
from cbam.models import build_model, count_flops, count_params
from cbam.tracking import NullTracker

from . import distributed as dist
from .checkpoint import load_checkpoint, load_model_state, save_checkpoint
from .loop import EpochMeter, StepParts, epoch_train_metrics, evaluate, train_one_epoch
from .optim import build_optimizer
from .records import RunRecords, git_commit

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Exit status of a run stopped by SIGTERM/SIGINT after writing last.pt: EX_TEMPFAIL, "try again",
# which is what a requeue script should do (`resume=auto` continues).
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; last.pt holds the state at the end of the current step."""

    exit_code = PREEMPTED_EXIT_CODE  # also the W&B run's exit code


def validate(cfg: DictConfig) -> None:
    for key in ("trainer.epochs", "data.batch_size", "data.eval_batch_size"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    if cfg.trainer.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r} is unknown: use one of {', '.join(PRECISIONS)}")
    if cfg.trainer.log_every_n_steps < 1:
        raise ConfigError(f"trainer.log_every_n_steps={cfg.trainer.log_every_n_steps} must be >= 1")


def resolve_device(name: str) -> torch.device:
    """Under torchrun, `auto` and `cuda` mean this process's own GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but CUDA is not available here: use trainer.device=auto or cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"trainer.device={name!r} is unknown: use auto, cpu or cuda")
    if name == "cuda" and dist.launched_world_size() > 1:
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def variant_label(cfg: DictConfig) -> str:
    """The attention preset, plus any attention.* overrides given on top of it: `cbam+arrangement=parallel`."""
    hydra = HydraConfig.get()
    extra = sorted(o.split(".", 1)[1] for o in hydra.overrides.task if o.startswith("attention."))
    return "+".join([hydra.runtime.choices["attention"], *extra])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # timm's Mixup draws from numpy
    torch.manual_seed(seed)  # CPU and every CUDA device


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"  # ru_maxrss is in KiB


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


def _checkpoint_to_resume(cfg: DictConfig, records: RunRecords) -> Path | None:
    if cfg.resume is None:
        if records.holds_a_run():
            raise ConfigError(
                f"{records.dir} already holds a run: pass resume=auto to continue it, or choose another hydra.run.dir"
            )
        return None
    if cfg.resume == "auto":
        if records.last.exists():
            return records.last
        log.info("resume=auto: no last.pt in %s, starting from scratch", records.dir)
        return None
    return Path(cfg.resume)


def train(cfg: DictConfig) -> dict:
    """One run; under torchrun, this process's rank of it."""
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    dist.join_process_group(device)
    try:
        return _train(cfg, device)
    except (Preempted, Diverged):
        # Every rank raised it after the same step: wait until all are done (rank 0 writing last.pt and
        # finishing W&B), since torchrun stops the others as soon as one process exits.
        dist.barrier()
        raise


def _train(cfg: DictConfig, device: torch.device) -> dict:
    hydra = HydraConfig.get()
    # Rank 0's dir for every rank: each resolved its own ${now:} (and cbam.cli gave ranks > 0 a throwaway one).
    records = RunRecords(Path(dist.broadcast_object(hydra.runtime.output_dir)))
    resume_path = _checkpoint_to_resume(cfg, records)
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    if checkpoint is not None and checkpoint["epoch"] >= cfg.trainer.epochs and records.summary.exists():
        log.info("%s already finished all %d epochs; nothing to do", records.dir, cfg.trainer.epochs)
        return json.loads(records.summary.read_text())
    main_process = dist.rank() == 0
    if checkpoint is not None and checkpoint["meter"]["steps"] and checkpoint.get("world_size", 1) != dist.world_size():
        raise ConfigError(
            f"{resume_path} was written mid-epoch by {checkpoint.get('world_size', 1)} process(es), and each "
            f"process's share of an epoch depends on their number: resume it with as many, not {dist.world_size()}"
        )

    seed_everything(cfg.seed)
    train_loader, val_loader = build_loaders(
        cfg.data, device=device, seed=cfg.seed, rank=dist.rank(), world_size=dist.world_size()
    )
    model = build_model(cfg).to(device)
    n_params = count_params(model)
    flops = count_flops(model, cfg.data.in_chans, cfg.data.image_size)
    if cfg.trainer.sync_bn and dist.is_distributed():
        model = dist.convert_sync_batchnorm(model, device)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model)
    scheduler = instantiate(cfg.optim.scheduler)(
        optimizer, steps_per_epoch=len(train_loader), epochs=cfg.trainer.epochs
    )
    precision = PRECISIONS[cfg.trainer.precision]
    autocast = {"device_type": device.type, "dtype": precision, "enabled": precision != torch.float32}
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    mixup = None
    if cfg.trainer.mixup.mixup_alpha > 0 or cfg.trainer.mixup.cutmix_alpha > 0:
        mixup = Mixup(**cfg.trainer.mixup, label_smoothing=cfg.optim.label_smoothing, num_classes=cfg.data.num_classes)
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    ema = ModelEmaV3(model, decay=cfg.trainer.ema_decay) if cfg.trainer.ema_decay else None

    start_epoch, global_step, best_top1, best_epoch, meter, wandb_id = 0, 0, float("-inf"), None, EpochMeter(), None
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"], str(resume_path))
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        if ema is not None:
            ema.load_state_dict(checkpoint["ema"])
        set_rng_state(checkpoint["rng"])
        start_epoch, global_step = checkpoint["epoch"], checkpoint["global_step"]
        best_top1, best_epoch, wandb_id = checkpoint["best_top1"], checkpoint["best_epoch"], checkpoint["wandb_id"]
        meter = EpochMeter(**checkpoint["meter"])
        if not main_process:  # rank 0's meter holds the sums of every rank (see the preemption below)
            meter = replace(meter, loss_sum=0.0, correct=0.0, count=0)
        log.info("resumed from %s at epoch %d, step %d of %d", resume_path, start_epoch, meter.steps, len(train_loader))

    step_model = model
    if dist.is_distributed():
        step_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.trainer.compile:
        step_model = torch.compile(step_model)
    parts = StepParts(
        model=step_model,
        raw_model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        criterion=criterion,
        autocast=autocast,
        channels_last=cfg.trainer.channels_last,
        grad_clip=cfg.trainer.grad_clip,
        mixup=mixup,
        ema=ema,
        log_every=cfg.trainer.log_every_n_steps,
        max_nonfinite=cfg.trainer.max_nonfinite_steps,
    )
    eval_model = ema.module if ema is not None else model
    variant = variant_label(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def checkpoint_state(epoch: int) -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": rng_state(),
            "epoch": epoch,
            "global_step": global_step,
            "meter": asdict(meter),
            "best_top1": best_top1,
            "best_epoch": best_epoch,
            "wandb_id": tracker.run_id,
            "world_size": dist.world_size(),  # a mid-epoch checkpoint resumes with as many processes
            "config": resolved,
        }

    if main_process:
        records.dir.mkdir(parents=True, exist_ok=True)
        records.write_config(cfg)
        records.keep_epochs_before(start_epoch)  # rows past the checkpoint are run again
    dist.barrier()  # the other ranks read metrics.jsonl below only once rank 0 has rewritten it
    group = cfg.group
    if group is None and hydra.mode == RunMode.MULTIRUN:
        group = Path(hydra.sweep.dir).name  # one W&B group per sweep
    tracker_cls = instantiate(cfg.logger) if main_process else NullTracker
    epochs = cfg.trainer.epochs
    history = records.read_metrics() if checkpoint else []
    run_start = time.perf_counter()

    with (
        tracker_cls(
            run_dir=records.dir,
            name=f"{variant}-s{cfg.seed}",
            group=group,
            tags=[variant, hydra.runtime.choices["model"], hydra.runtime.choices["data"], *cfg.tags],
            config=resolved,
            run_id=wandb_id,
        ) as tracker,
        stop_on_signals(second_kills=not dist.is_distributed()) as should_stop,
    ):
        plain_progress = not sys.stdout.isatty()  # logs and batch jobs get lines instead of a bar

        def on_step_log(metrics: dict, step: int) -> None:
            tracker.log(metrics, step=step)
            if plain_progress:
                log.info("step %d: loss %.4f, lr %.4g", step, metrics["train/step_loss"], metrics["lr"])

        for epoch in range(start_epoch, epochs):
            meter, global_step, finished = train_one_epoch(
                parts,
                train_loader,
                epoch=epoch,
                device=device,
                meter=meter,
                global_step=global_step,
                on_step_log=on_step_log,
                should_stop=should_stop,
            )
            if not finished:
                # One meter goes into last.pt: rank 0's takes the partial sums of all ranks, so that the
                # epoch's all-reduce after resuming counts each sample once.
                sums = torch.tensor([meter.loss_sum, meter.correct, meter.count], dtype=torch.float64)
                dist.all_reduce_sum(sums)
                meter = replace(meter, loss_sum=sums[0].item(), correct=sums[1].item(), count=int(sums[2].item()))
                if main_process:
                    save_checkpoint(checkpoint_state(epoch), records.last)
                raise Preempted(
                    f"stopped at epoch {epoch}, step {meter.steps}; last.pt written: resume with resume=auto"
                )
            row = {"epoch": epoch, "step": global_step, "lr": optimizer.param_groups[0]["lr"]}
            row |= epoch_train_metrics(meter)
            val = evaluate(
                eval_model,
                val_loader,
                device=device,
                num_classes=cfg.data.num_classes,
                autocast=autocast,
                channels_last=cfg.trainer.channels_last,
            )
            per_class = val.pop("val/per_class_top1")
            row |= val
            is_best = row["val/top1"] > best_top1
            if is_best:
                best_top1, best_epoch = row["val/top1"], epoch
            meter = EpochMeter()
            history.append(row)
            log.info(
                "epoch %d/%d  train loss %.4f top1 %.2f | val loss %.4f top1 %.2f top5 %.2f | "
                "%.0f img/s, data wait %.1f%%, %.1f s",
                epoch + 1, epochs, row["train/loss"], row["train/top1"], row["val/loss"], row["val/top1"],
                row["val/top5"], row["train/img_per_s"], 100 * row["train/data_wait_share"], row["train/epoch_time_s"],
            )  # fmt: skip
            if main_process:
                records.append_metrics(row)
                tracker.log(row, step=global_step)
                state = checkpoint_state(epoch + 1)
                save_checkpoint(state, records.last)
                if is_best:
                    save_checkpoint(state, records.best)
            dist.barrier()  # rank 0's checkpoints are complete before any rank goes on (or exits)

        peak_mb, peak_kind = peak_memory_mb(device)
        final = history[-1]
        train_rates = [r["train/img_per_s"] for r in history if r["train/img_per_s"] is not None]
        summary = {
            "variant": variant,
            "attention": hydra.runtime.choices["attention"],
            "model": hydra.runtime.choices["model"],
            "data": cfg.data.name,
            "seed": cfg.seed,
            "epochs": epochs,
            "final": {k: final[k] for k in ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5")},
            "best_val_top1": best_top1,
            "best_epoch": best_epoch,
            "val_per_class_top1": per_class,
            "params": n_params,
            "flops": flops,
            "train_img_per_s": sum(train_rates) / len(train_rates) if train_rates else None,
            "eval_img_per_s": final["val/img_per_s"],
            "peak_memory_mb": peak_mb,
            "peak_memory_kind": peak_kind,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "world_size": dist.world_size(),
            "wall_time_s": time.perf_counter() - run_start,
            "git_commit": git_commit(),
            "wandb_run_id": tracker.run_id,
            "run_dir": str(records.dir),
            "overrides": list(hydra.overrides.task),
        }
        if main_process:
            records.write_summary(summary)
            tracker.summary(
                {
                    "best_val_top1": best_top1,
                    "train_img_per_s": summary["train_img_per_s"],
                    "eval_img_per_s": summary["eval_img_per_s"],
                    "params": n_params,
                    "flops": flops,
                    "peak_memory_mb": peak_mb,
                }
            )
            if cfg.trainer.visualize:
                _end_of_run_figures(eval_model, val_loader, records, f"{variant}-s{cfg.seed}", tracker, global_step)
    log.info("best val top1 %.2f at epoch %d; records in %s", best_top1, best_epoch + 1, records.dir)
    return summary


def _end_of_run_figures(model, val_loader, records: RunRecords, title: str, tracker, step: int) -> None:
    """trainer.visualize: attention maps, Grad-CAM and channel weights of the final model, into <run>/viz
    and W&B. Figures are extras, like W&B: a failure warns and the finished run stays finished."""
    from cbam.viz import log_end_of_run  # matplotlib only when asked for

    try:
        log_end_of_run(model, val_loader, records.dir, title=title, tracker=tracker, step=step)
    except Exception as e:
        log.warning(
            "end-of-run figures failed (%s); make them with scripts/visualize.py checkpoint=%s", e, records.best
        )
