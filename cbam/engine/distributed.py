"""Data-parallel training under torchrun: joining the process group, and helpers that are no-ops in a
single process and reduce across ranks otherwise.

torchrun starts one process per device and tells each its place through the environment: RANK,
LOCAL_RANK (its device on this node), WORLD_SIZE, MASTER_ADDR/MASTER_PORT (the rendezvous).
"""

import atexit
import os

import torch
import torch.distributed as dist
from torch import nn


def launched_by_torchrun() -> bool:
    """torchrun's environment, also with one process (which then joins a process group of one, so that
    NCCL, DDP and compile under DDP run on a single GPU too)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """torchrun's process count, known before (and whether or not) this process joins the group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def join_process_group(device: torch.device) -> None:
    """Under torchrun, join its process group, once per process, and leave it at exit (also after an error).

    Once per process rather than per run: a multirun calls train() once per job, and a group left
    cannot be joined again through torchrun's store. Nothing happens without torchrun, nor when the
    caller already joined a group. CUDA uses NCCL; small CPU tensors (epoch sums, objects) go through
    Gloo in the same group.
    """
    if not launched_by_torchrun() or is_distributed():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and torch.cuda.current_device() must agree with LOCAL_RANK
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(leave_process_group)


def backend() -> str:
    return dist.get_backend() if is_distributed() else "none"


def leave_process_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a picklable value)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP sends them only at the start of
    a training forward, so after an epoch's last step each rank's differ by its own batch (without
    SyncBatchNorm; an EMA copy's too): evaluated so, each rank's share of val would be scored by another
    model than the one rank 0 saves, and eval.py of that checkpoint would not give the run's numbers."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_rank(*flags: bool, device: torch.device) -> list[bool]:
    """For each flag, whether it is set on any rank: one tiny all-reduce, none in a single process.
    Decisions that change which collectives run (skip a step, stop) must be the same on every rank."""
    if not is_distributed():
        return [bool(f) for f in flags]
    counts = all_reduce_sum(torch.tensor([bool(f) for f in flags], dtype=torch.int32, device=device))
    return [n > 0 for n in counts.tolist()]


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient: d(sum_r x_r)/dx_r = 1 on every rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.clone())


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode statistics are over the global batch, for CPU tensors (torch's
    SyncBatchNorm takes CUDA tensors only). The same numbers as one BatchNorm2d over all ranks' samples:
    biased variance to normalise, unbiased for the running estimate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W)
        if not (self.training and is_distributed()):
            return super().forward(x)
        xf, dims = x.to(torch.promote_types(x.dtype, torch.float32)), (0, 2, 3)  # half inputs: float32 statistics
        n = xf.new_tensor([x.numel() / x.shape[1]])  # (1,) samples per channel on this rank
        total = _SumOverRanks.apply(torch.cat([xf.sum(dims), n]))  # (C + 1,) over all ranks
        mean, count = total[:-1] / total[-1], total[-1]  # (C,), ()
        centred = xf - mean[None, :, None, None]
        var = _SumOverRanks.apply(centred.square().sum(dims)) / count  # (C,) biased; two passes, as BatchNorm2d
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of `model` (the attention's DescriptorBatchNorm too) as a synchronised one.

    The converted layers are plain SyncBatchNorm/GlooSyncBatchNorm with the same state-dict keys, so
    checkpoints load into a model without them (eval.py). DescriptorBatchNorm's clear error for a
    batch of 1 goes with it; synchronised, such a layer sees world_size x batch_size >= 2 samples.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            sync = GlooSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            sync.load_state_dict(child.state_dict(), assign=True)  # its buffers, with their dtype and device
            if child.affine:
                sync.weight, sync.bias = child.weight, child.bias  # the same Parameters, whoever holds them already
            sync.train(child.training)
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return model
