"""Two loaders with one interface: `epoch(epoch, skip)` yields normalised (x, y) batches on the device.

Both draw the order and the augmentation from a generator seeded by (seed, epoch) alone, so a run resumed
mid-epoch re-creates that epoch and skips the batches it already did.
"""

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as TF

from .sources import DataError


class Loader(Protocol):
    batch_size: int
    num_samples: int  # images this rank sees per epoch (after drop_last for train)
    classes: list[str]

    def __len__(self) -> int: ...  # batches per epoch on this rank

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # One stream per (seed, epoch) pair: `seed + epoch`, as DistributedSampler seeds, would give
    # seed 1 epoch 0 the order of seed 0 epoch 1.
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]))


class Shard:
    """Which samples this rank sees in an epoch, and in which order.

    Train: a seeded shuffle of all n samples, dealt round-robin to the ranks (as DistributedSampler does),
    each shard cut to whole batches so that every rank runs the same number of steps. Val: every
    world_size-th sample in dataset order, no padding, so the ranks together see each sample once.
    """

    def __init__(self, n: int, *, train: bool, batch_size: int, seed: int, rank: int, world_size: int):
        self.n, self.train, self.batch_size, self.seed = n, train, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_samples = (n // world_size) // batch_size * batch_size if train else len(range(rank, n, world_size))
        if self.num_samples == 0:
            raise DataError(
                f"{n} {'train' if train else 'val'} images over {world_size} process(es) do not fill one batch of "
                f"{batch_size}: lower data.{'batch_size' if train else 'eval_batch_size'}"
            )

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def take(self, per_sample: torch.Tensor) -> torch.Tensor:
        """This rank's part of a tensor with one entry per position of the epoch's order."""
        return per_sample[self.rank :: self.world_size][: self.num_samples]

    def order(self, g: torch.Generator | None) -> torch.Tensor:
        return self.take(torch.randperm(self.n, generator=g) if self.train else torch.arange(self.n))  # (num_samples,)


class Normalize:
    """uint8 images on the device to normalised float32, as torchvision's ToDtype(scale=True) and Normalize
    compute it; mean and std live on the device (TF.normalize with Python lists would build and copy two
    tensors every batch)."""

    def __init__(self, mean, std, device: torch.device):
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=device).view(-1, 1, 1)  # (C, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=device).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return TF.to_dtype(x, torch.float32, scale=True).sub_(self.mean).div_(self.std)


class MemoryLoader:
    """The whole uint8 dataset as one tensor on the device, cropped, flipped and normalised in batch (airbench)."""

    def __init__(self, x, y, classes, *, train, batch_size, pad, flip, mean, std, device, seed, rank, world_size):
        self.shard = Shard(len(x), train=train, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self.batch_size, self.num_samples, self.classes = batch_size, self.shard.num_samples, classes
        self.train, self.pad, self.flip = train, pad, flip
        self.size = x.shape[-2:]
        # Zero padding once for the whole dataset, as RandomCrop(padding=pad) pads each image.
        self.x = torch.nn.functional.pad(x, (pad, pad, pad, pad)).to(device)  # (N, C, H + 2 pad, W + 2 pad)
        self.y = y.to(device)
        self.normalize = Normalize(mean, std, device)

    def __len__(self) -> int:
        return len(self.shard)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = epoch_generator(self.shard.seed, epoch) if self.train else None
        order = self.shard.order(g)
        if self.train:  # the whole epoch's augmentation up front: skipping batches skips nothing random
            n = self.shard.n
            offsets = torch.randint(2 * self.pad + 1, (n, 2), generator=g)  # (n, 2): crop corner in the padded image
            dy, dx = self.shard.take(offsets).T  # (num_samples,) each
            flip = self.shard.take(torch.rand(n, generator=g) < 0.5) & self.flip
        else:
            dy = dx = torch.zeros_like(order)
            flip = torch.zeros_like(order, dtype=torch.bool)
        device = self.x.device
        order, dy, dx, flip = order.to(device), dy.to(device), dx.to(device), flip.to(device)
        for b in range(skip, len(self)):
            i = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self._crop(order[i], dy[i], dx[i], flip[i]), self.y[order[i]]

    def _crop(self, idx, dy, dx, flip) -> torch.Tensor:
        (h, w), device = self.size, self.x.device
        rows = dy[:, None] + torch.arange(h, device=device)  # (B, H)
        cols = torch.arange(w, device=device)
        cols = dx[:, None] + torch.where(flip[:, None], cols.flip(0), cols)  # (B, W), mirrored where flipped
        chans = torch.arange(self.x.shape[1], device=device)[:, None, None]  # (C, 1, 1)
        x = self.x[idx[:, None, None, None], chans, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
        return self.normalize(x)  # as the torch loader's (whose crops and flips are other draws)


class TensorImages(Dataset):
    """A uint8 (N, C, H, W) tensor dataset with a per-image transform, for the torch loader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i]


class _Seeded(Dataset):
    """`dataset[index]` under the torch seed the sampler drew for that position of the epoch.

    torchvision's random transforms use the global torch generator, which in a worker depends on the
    worker's seed and on what it loaded before (persistent workers carry it across epochs); seeding each
    sample makes the augmentation depend only on (seed, epoch), whatever num_workers is.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):  # with num_workers=0 this runs in the trainer's process
            torch.manual_seed(seed)
            return self.dataset[index]


class _EpochSampler(Sampler):
    """(index, seed) pairs of the current epoch; set before each pass, as DistributedSampler.set_epoch."""

    items: Sequence[tuple[int, int]] = ()

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class TorchLoader:
    """A torch DataLoader with worker processes and per-image transforms (PIL decoding for ImageFolder).

    The workers hand over uint8 images; pinned (CUDA), copied to the device on a side stream one batch
    ahead, so the copy overlaps the step before it, and normalised there.
    """

    def __init__(self, dataset, classes, *, train, batch_size, num_workers, mean, std, device, seed, rank, world_size):
        self.shard = Shard(
            len(dataset), train=train, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size
        )
        self.batch_size, self.num_samples, self.classes = batch_size, self.shard.num_samples, classes
        self.train, self.device = train, device
        self.normalize = Normalize(mean, std, device)
        self.sampler = _EpochSampler()
        self.loader = DataLoader(
            _Seeded(dataset),
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0,  # no fork per epoch
        )

    def __len__(self) -> int:
        return len(self.shard)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = epoch_generator(self.shard.seed, epoch) if self.train else None
        order = self.shard.order(g)
        if self.train:
            seeds = self.shard.take(torch.randint(2**62, (self.shard.n,), generator=g))  # one per sample
        else:
            seeds = torch.zeros_like(order)  # val transforms draw nothing
        start = skip * self.batch_size  # skipped batches are not even loaded
        self.sampler.items = list(zip(order[start:].tolist(), seeds[start:].tolist(), strict=True))
        for x, y in _prefetched(self.loader, self.device):
            yield self.normalize(x), y


def _prefetched(batches, device: torch.device):
    """(x, y) on `device`. On CUDA the copy of batch k + 1 is queued on a side stream before batch k is
    handed over; the compute stream waits for it only when it uses it."""
    if device.type != "cuda":
        for x, y in batches:
            yield x.to(device), y.to(device)
        return
    side, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    pending = None
    for x, y in batches:
        with torch.cuda.stream(side):
            copied = (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        if pending is not None:
            yield _arrived(pending, side, compute)
        pending = copied
    if pending is not None:
        yield _arrived(pending, side, compute)


def _arrived(batch, side, compute):
    compute.wait_stream(side)
    for t in batch:
        t.record_stream(compute)  # the caching allocator must not reuse the memory before compute is done
    return batch
