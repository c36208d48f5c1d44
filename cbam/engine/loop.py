"""One epoch of training and one pass of evaluation, as plain functions."""

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cbam.errors import Diverged

from .distributed import all_reduce_sum, any_rank
from .state import EpochMeter, TrainState

log = logging.getLogger(__name__)


@dataclass
class StepParts:
    """How a training step runs, built once per run; what it updates is the run's TrainState."""

    model: nn.Module  # the module that runs the step: possibly compiled, possibly DDP-wrapped
    criterion: nn.Module
    autocast: dict  # kwargs of torch.autocast
    channels_last: bool
    grad_clip: float | None
    mixup: Callable | None  # timm.data.Mixup: (x, y) -> (x, soft targets)
    log_every: int
    max_nonfinite: int  # steps with a non-finite loss to skip before the run stops


def _prepare(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress(total: int, initial: int, desc: str):
    """A tqdm bar on a terminal; elsewhere (logs, SLURM) nothing, and log lines carry the progress."""
    return tqdm(
        total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stdout.isatty()
    )


def train_one_epoch(
    parts: StepParts,
    state: TrainState,
    loader,
    *,
    device: torch.device,
    on_step_log: Callable[[dict, int], None],
    should_stop: Callable[[], bool],
    warmup_steps: int = 5,
) -> bool:
    """Train from step `state.meter.steps` of epoch `state.epoch` to its end, or until `should_stop()`.

    Updates `state` (weights, meter, global step) and returns whether the epoch finished. Throughput
    counts only the steps after the first `warmup_steps` of this call (allocator, cudnn and compile warm-up).
    """
    model, meter, epoch = parts.model, state.meter, state.epoch
    model.train()
    loss_sum = torch.tensor(meter.loss_sum, device=device, dtype=torch.float64)
    correct = torch.tensor(meter.correct, device=device, dtype=torch.float64)
    timing = dict(meter.timing)
    start = time.perf_counter()
    timed_start, timed_images = None, 0
    bar = _progress(len(loader), meter.steps, f"epoch {epoch}")
    batches = iter(loader.epoch(epoch, skip=meter.steps))
    warmup_steps = min(warmup_steps, len(loader) - meter.steps - 1)  # a short epoch still gets timed
    finished = True
    local_step = 0
    if warmup_steps <= 0:
        timed_start = time.perf_counter()
    while True:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        timing["wait"] += time.perf_counter() - t_wait
        if batch is None:
            break
        x, y = batch
        x = _prepare(x, parts.channels_last)
        inputs, targets = parts.mixup(x, y) if parts.mixup is not None else (x, y)
        with torch.autocast(**parts.autocast):
            logits = model(inputs)
            loss = parts.criterion(logits, targets)
        # Under DDP every rank must skip the same steps and stop after the same step, or the gradient
        # all-reduce waits forever: one tiny all-reduce per step decides both (nothing in one process).
        nonfinite, stop = any_rank(not torch.isfinite(loss), should_stop(), device=device)
        if nonfinite:
            meter.nonfinite += 1
            if meter.nonfinite > parts.max_nonfinite:
                raise Diverged(
                    f"non-finite loss ({loss.item()}) at epoch {epoch}, step {meter.steps + 1} of {len(loader)} "
                    f"(global step {state.global_step + 1}); lower optim.optimizer.lr, set trainer.grad_clip, "
                    f"or allow skips with trainer.max_nonfinite_steps (now {parts.max_nonfinite})"
                )
            log.warning(
                "non-finite loss at epoch %d step %d: step skipped (%d so far)", epoch, meter.steps + 1, meter.nonfinite
            )
            state.optimizer.zero_grad(set_to_none=True)
        else:
            state.optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
            if parts.grad_clip:
                state.scaler.unscale_(state.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), parts.grad_clip)
            state.scaler.step(state.optimizer)
            state.scaler.update()
            if state.ema is not None:
                state.ema.update(state.model, step=state.global_step)
            loss_sum += loss.detach().double() * y.shape[0]
            correct += (logits.detach().argmax(1) == y).sum()  # against the unmixed labels
            meter.count += y.shape[0]
        state.scheduler.step()
        meter.steps += 1
        state.global_step += 1
        local_step += 1
        bar.update()
        if local_step == warmup_steps:
            _sync(device)
            timed_start = time.perf_counter()
        elif local_step > warmup_steps:
            timed_images += y.shape[0]
        if state.global_step % parts.log_every == 0:
            lr = state.optimizer.param_groups[0]["lr"]
            step_loss = loss.item()
            bar.set_postfix(
                loss=f"{step_loss:.3f}", acc=f"{(correct / max(meter.count, 1)).item():.3f}", lr=f"{lr:.3g}"
            )
            on_step_log({"train/step_loss": step_loss, "lr": lr}, state.global_step)
        if stop:
            finished = meter.steps >= len(loader)
            break
    bar.close()
    _sync(device)
    now = time.perf_counter()
    timing["elapsed"] += now - start
    if timed_start is not None and timed_images:
        timing["timed"] += now - timed_start
        timing["timed_images"] += timed_images
    meter.loss_sum, meter.correct, meter.timing = loss_sum.item(), correct.item(), timing
    return finished


def epoch_train_metrics(meter: EpochMeter) -> dict:
    """The epoch's train metrics over all ranks: sums added up, img/s the ranks' rates added up."""
    timing = meter.timing
    rate = timing["timed_images"] / timing["timed"] if timing["timed"] else float("nan")
    sums = all_reduce_sum(torch.tensor([meter.loss_sum, meter.correct, meter.count, rate], dtype=torch.float64))
    return {
        "train/loss": (sums[0] / sums[2]).item(),
        "train/top1": 100 * (sums[1] / sums[2]).item(),
        "train/img_per_s": sums[3].item(),
        "train/data_wait_share": timing["wait"] / timing["elapsed"] if timing["elapsed"] else float("nan"),
        "train/epoch_time_s": timing["elapsed"],
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    device: torch.device,
    num_classes: int,
    autocast: dict,
    channels_last: bool,
    warmup_steps: int = 2,
) -> dict:
    """Loss, top-1, top-5 and per-class accuracy over the whole val split (summed across ranks)."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    topk_correct = torch.zeros(2, device=device, dtype=torch.float64)
    class_correct = torch.zeros(num_classes, device=device, dtype=torch.float64)
    class_count = torch.zeros(num_classes, device=device, dtype=torch.float64)
    k = min(5, num_classes)
    warmup_steps = min(warmup_steps, len(loader) - 1)  # a one-batch val split is still timed
    timed_start, timed_images = (time.perf_counter() if warmup_steps <= 0 else None), 0
    for i, (x, y) in enumerate(_progress_iter(loader)):
        with torch.autocast(**autocast):
            logits = model(_prepare(x, channels_last))
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        top = logits.topk(k, dim=1).indices  # (N, k)
        hit1 = top[:, 0] == y
        topk_correct[0] += hit1.sum()
        topk_correct[1] += (top == y[:, None]).any(1).sum()
        class_correct.index_add_(0, y, hit1.double())
        class_count.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        if i + 1 == warmup_steps:
            _sync(device)
            timed_start = time.perf_counter()
        elif i + 1 > warmup_steps:
            timed_images += y.shape[0]
    _sync(device)
    elapsed = time.perf_counter() - timed_start if timed_start is not None else 0.0
    rate = torch.tensor(timed_images / elapsed if timed_images else float("nan"), device=device, dtype=torch.float64)
    for t in (loss_sum, topk_correct, class_correct, class_count, rate):
        all_reduce_sum(t)  # the ranks evaluate side by side: their rates add up
    n = class_count.sum()
    return {
        "val/loss": (loss_sum / n).item(),
        "val/top1": 100 * (topk_correct[0] / n).item(),
        "val/top5": 100 * (topk_correct[1] / n).item(),
        "val/img_per_s": rate.item(),
        "val/per_class_top1": (100 * class_correct / class_count.clamp(min=1)).tolist(),
    }


def _progress_iter(loader):
    bar = _progress(len(loader), 0, "eval")
    for batch in loader.epoch(0):
        yield batch
        bar.update()
    bar.close()
