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

from .distributed import all_reduce_max, all_reduce_sum, any_rank, is_distributed
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


class NormStatistics:
    """The BatchNorm running statistics of `model`, kept from before a step and put back where the step was
    skipped: its forward has already moved them, and a non-finite batch would leave them NaN for good (the
    weights are the skipped optimizer step's to keep). On the device, no host sync; only where steps may be
    skipped (trainer.max_nonfinite_steps > 0), as a first non-finite step otherwise ends the run."""

    def __init__(self, model: nn.Module, enabled: bool):
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)] if enabled else []
        self.buffers = [b for m in norms for b in m.buffers(recurse=False)]
        self.kept: list[torch.Tensor] = []

    def keep(self) -> None:
        self.kept = [b.clone() for b in self.buffers]

    def restore_where(self, skipped: torch.Tensor) -> None:
        for buffer, kept in zip(self.buffers, self.kept, strict=True):
            buffer.copy_(torch.where(skipped, kept, buffer))


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


class StepChecks:
    """Non-finite steps and stop requests, decided without a host sync on each step.

    A step whose gradients are not all finite (a non-finite loss gives such gradients) is skipped on the
    device: the fused optimizer's `found_inf`, as GradScaler uses it, leaves weights and optimizer state as
    they were (`optimizer_step` clears what torch's fused SGD leaves of a skipped first step). Under DDP the
    gradients are averaged over the ranks first, so every rank skips the same steps with no collective of
    its own. The count is read back every `log_every` steps and at the end of
    the epoch (`check`): the run stops there, with exit 3, once more than `max_nonfinite` steps were skipped,
    naming the step that went past the allowance (the steps between it and the check were skipped too).
    With fp16 (`per_rank_loss`) a step counts when this rank's loss is not finite (GradScaler skips and
    rescales on overflowing gradients itself), which ranks do not share: under DDP the check then takes the
    largest count over the ranks (one all-reduce), so that all stop together.
    Stop signals: every step in one process, every `log_every` steps (one all-reduce) under torchrun.
    """

    def __init__(
        self, parts: StepParts, meter: EpochMeter, device: torch.device, epoch: int, steps: int, per_rank_loss: bool
    ):
        self.parts, self.meter, self.epoch, self.steps = parts, meter, epoch, steps
        self.agree = per_rank_loss and is_distributed()
        self.skipped = torch.full((), meter.nonfinite, dtype=torch.int64, device=device)  # on the device
        self.over_at = torch.full((), -1, dtype=torch.int64, device=device)  # epoch step past the allowance
        self.step = torch.full((), meter.steps, dtype=torch.int64, device=device)  # this epoch's steps so far
        self.reported = min(meter.nonfinite, parts.max_nonfinite)

    def record(self, bad: torch.Tensor) -> None:
        self.step += 1
        self.skipped += bad
        past = (self.skipped > self.parts.max_nonfinite) & (self.over_at < 0)
        self.over_at = torch.where(past, self.step, self.over_at)

    def check(self) -> None:
        """The host sync: warn about the steps skipped since the last check, stop past the allowance."""
        if self.agree:
            self.skipped = all_reduce_max(self.skipped)
            self.over_at = all_reduce_max(self.over_at)
        skipped = int(self.skipped)
        self.meter.nonfinite = skipped
        allowed = self.parts.max_nonfinite
        for k in range(self.reported + 1, min(skipped, allowed) + 1):
            log.warning("non-finite loss or gradients in epoch %d: step skipped (%d so far)", self.epoch, k)
        self.reported = max(self.reported, min(skipped, allowed))
        if skipped > allowed:
            raise Diverged(
                f"non-finite loss at epoch {self.epoch}, step {int(self.over_at)} of {self.steps} (noticed at "
                f"step {self.meter.steps}); lower optim.optimizer.lr, set trainer.grad_clip, or allow skips "
                f"with trainer.max_nonfinite_steps (now {allowed})"
            )

    def stop_agreed(self, requested: bool, at_check: bool) -> bool:
        if not is_distributed():
            return requested
        return at_check and any_rank(requested, device=self.skipped.device)[0]


def optimizer_step(
    state: TrainState, model: nn.Module, loss: torch.Tensor, total_norm: torch.Tensor | None
) -> torch.Tensor:
    """The optimizer's step on the gradients in `model`, skipped (weights and optimizer state left as they
    were) where the loss or the gradients are not finite: that flag is returned, () bool on the device."""
    # torch's fused SGD makes its momentum buffers with empty_like on its first step and fills them in the
    # kernel, which a skipped step does not run: the next step would take their garbage for momentum (fp16's
    # first steps often overflow). Until a step has made them, a skipped step is looked for (a host sync).
    lazy_buffers = not state.optimizer.state and any(g.get("momentum") for g in state.optimizer.param_groups)
    if state.scaler.is_enabled():
        bad = ~torch.isfinite(loss.detach())  # overflowing fp16 gradients are the scaler's to skip and rescale
        scale = state.scaler.get_scale() if lazy_buffers else None
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        bad = _nonfinite_gradients(model, total_norm)
        state.optimizer.found_inf = bad.float()  # the fused step leaves everything as it was when set
        state.optimizer.step()
    if lazy_buffers:
        skipped = state.scaler.get_scale() < scale if state.scaler.is_enabled() else bool(bad)
        if skipped:  # it leaves what it found: no state
            state.optimizer.state.clear()
    return bad


def _nonfinite_gradients(model: nn.Module, total_norm: torch.Tensor | None) -> torch.Tensor:
    """() bool on the device: some gradient entry is NaN or infinite."""
    if total_norm is None:  # no clipping computed it: the largest |entry| of each gradient, in one foreach op
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        total_norm = torch.stack(torch._foreach_norm(grads, float("inf"))).amax()
    return ~torch.isfinite(total_norm)


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

    Updates `state` (weights, meter, global step) and returns whether the epoch finished. Between log steps
    nothing waits for the device (StepChecks). Throughput counts only the steps after the first
    `warmup_steps` of this call (allocator, cudnn and compile warm-up).
    """
    model, meter, epoch = parts.model, state.meter, state.epoch
    model.train()
    # [sum of loss * n, correct, n] over the steps not skipped, on the device
    sums = torch.tensor([meter.loss_sum, meter.correct, meter.count], dtype=torch.float64, device=device)
    one = torch.ones((), dtype=torch.float64, device=device)
    checks = StepChecks(parts, meter, device, epoch, len(loader), per_rank_loss=state.scaler.is_enabled())
    norm_statistics = NormStatistics(state.model, enabled=parts.max_nonfinite > 0)
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
        norm_statistics.keep()
        with torch.autocast(**parts.autocast):
            logits = model(inputs)
            loss = parts.criterion(logits, targets)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        total_norm = None
        if parts.grad_clip:
            state.scaler.unscale_(state.optimizer)
            total_norm = nn.utils.clip_grad_norm_(model.parameters(), parts.grad_clip, foreach=True)
        bad = optimizer_step(state, model, loss, total_norm)
        norm_statistics.restore_where(bad)
        if state.ema is not None:
            state.ema.update(state.model, step=state.global_step)  # a skipped step left the weights unchanged
        n = y.shape[0]
        correct = (logits.detach().argmax(1) == y).sum()  # against the unmixed labels
        this_step = torch.stack([loss.detach().double() * n, correct.double(), one * n])
        sums += torch.where(bad | ~torch.isfinite(this_step[0]), 0.0, this_step)
        checks.record(bad)
        state.scheduler.step()
        meter.steps += 1
        state.global_step += 1
        local_step += 1
        bar.update()
        if local_step == warmup_steps:
            _sync(device)
            timed_start = time.perf_counter()
        elif local_step > warmup_steps:
            timed_images += n
        at_check = state.global_step % parts.log_every == 0
        if at_check:
            checks.check()
            lr = state.optimizer.param_groups[0]["lr"]
            step_loss, (_, correct_sum, count) = loss.item(), sums.tolist()
            bar.set_postfix(loss=f"{step_loss:.3f}", acc=f"{correct_sum / max(count, 1):.3f}", lr=f"{lr:.3g}")
            on_step_log({"train/step_loss": step_loss, "lr": lr}, state.global_step)
        if checks.stop_agreed(should_stop(), at_check):
            finished = meter.steps >= len(loader)
            break
    bar.close()
    checks.check()
    _sync(device)
    now = time.perf_counter()
    timing["elapsed"] += now - start
    if timed_start is not None and timed_images:
        timing["timed"] += now - timed_start
        timing["timed_images"] += timed_images
    meter.loss_sum, meter.correct, count = sums.tolist()
    meter.count, meter.timing = int(count), timing
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
