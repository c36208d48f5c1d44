"""Loaders from the composed `cfg.data` node: its `source` reads the files, `loader` feeds the device."""

import torch
from omegaconf import DictConfig
from torchvision.transforms import v2

from cbam.errors import instantiate_config

from .loaders import Loader, MemoryLoader, TensorImages, TorchLoader
from .sources import DataError, FolderData, TensorData

HOLDOUT_SEED = 0  # the held-out split belongs to the dataset: the same for every run seed, so seeds vary training only


def load_source(data_cfg: DictConfig) -> TensorData | FolderData:
    return instantiate_config(data_cfg.source, "data.source")


def build_loaders(
    data_cfg: DictConfig, *, device: torch.device, seed: int, rank: int = 0, world_size: int = 1
) -> tuple[Loader, Loader]:
    """(train, val) loaders for the composed `cfg.data` node."""
    return make_loaders(load_source(data_cfg), data_cfg, device=device, seed=seed, rank=rank, world_size=world_size)


def build_val_loader(data_cfg: DictConfig, *, device: torch.device, seed: int) -> Loader:
    """The val loader alone (eval.py, scripts/visualize.py): the train split is not put on the device."""
    return make_loaders(load_source(data_cfg), data_cfg, device=device, seed=seed, with_train=False)[1]


def dataset_classes(data_cfg: DictConfig) -> list[str]:
    """Class names in label order (e.g. Fashion-MNIST's "T-shirt/top", ...); reads the dataset."""
    return load_source(data_cfg).classes


def make_loaders(
    data: TensorData | FolderData,
    data_cfg: DictConfig,
    *,
    device: torch.device,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    with_train: bool = True,
) -> tuple[Loader | None, Loader]:
    """build_loaders for a source already read; with_train=False builds no train loader (None)."""
    if data_cfg.loader not in ("memory", "torch"):
        raise DataError(f"data.loader={data_cfg.loader} must be memory or torch")
    if len(data.classes) != data_cfg.num_classes:
        raise DataError(f"{data_cfg.name} has {len(data.classes)} classes: set data.num_classes={len(data.classes)}")
    for key, what in (("holdout", "images (0: the dataset's own val split)"), ("pad", "pixels (0: no cropping)")):
        value = data_cfg.get(key, 0)  # an image folder's recipe has no pad
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"data.{key}={value} must be a whole number of {what}")
    common = dict(device=device, seed=seed, rank=rank, world_size=world_size)
    train_opts = dict(train=True, batch_size=data_cfg.batch_size, **common)  # shuffled, augmented, drop_last
    val_opts = dict(train=False, batch_size=data_cfg.eval_batch_size, **common)

    if isinstance(data, FolderData):
        if data_cfg.loader == "memory":
            raise DataError(f"{data_cfg.name} does not fit in memory: use data.loader=torch")
        if data_cfg.holdout:
            raise DataError(
                f"data.holdout needs a dataset held as tensors, which {data_cfg.name} is not: use data.holdout=0"
            )
        if data_cfg.mean is None or data_cfg.std is None:
            raise DataError(
                f"data.mean and data.std are computed on load only for datasets held as tensors, which "
                f"{data_cfg.name} is not: set both to its train split's per-channel statistics"
            )
        torch_opts = dict(num_workers=data_cfg.num_workers, mean=data_cfg.mean, std=data_cfg.std)
        return (
            TorchLoader(data.train, data.classes, **torch_opts, **train_opts) if with_train else None,
            TorchLoader(data.val, data.classes, **torch_opts, **val_opts),
        )

    shape = (data_cfg.in_chans, data_cfg.image_size, data_cfg.image_size)
    if tuple(data.train_x.shape[1:]) != shape:
        raise DataError(
            f"{data_cfg.name} images are {tuple(data.train_x.shape[1:])} (C, H, W) but data.in_chans and "
            f"data.image_size say {shape}: make them match"
        )
    data = hold_out(data, data_cfg.holdout)
    mean, std = statistics(data, data_cfg)
    if data_cfg.loader == "memory":
        train_opts.update(pad=data_cfg.pad, flip=data_cfg.flip, mean=mean, std=std)
        return (
            MemoryLoader(data.train_x, data.train_y, data.classes, **train_opts) if with_train else None,
            MemoryLoader(data.val_x, data.val_y, data.classes, pad=0, flip=False, mean=mean, std=std, **val_opts),
        )
    # The memory loader's augmentation, one uint8 image at a time; normalised on the device, as there.
    augment = [v2.RandomCrop(shape[1:], padding=data_cfg.pad)] if data_cfg.pad else []
    augment += [v2.RandomHorizontalFlip()] if data_cfg.flip else []
    train = TensorImages(data.train_x, data.train_y, v2.Compose(augment) if augment else v2.Identity())
    val = TensorImages(data.val_x, data.val_y, v2.Identity())
    torch_opts = dict(num_workers=data_cfg.num_workers, mean=mean, std=std)
    return (
        TorchLoader(train, data.classes, **torch_opts, **train_opts) if with_train else None,
        TorchLoader(val, data.classes, **torch_opts, **val_opts),
    )


def hold_out(data: TensorData, k: int) -> TensorData:
    """k seeded random train images become the val split; the official test split goes unused."""
    n = len(data.train_y)
    if k == 0:
        return data
    if not 0 < k < n:
        raise DataError(
            f"data.holdout={k} must be between 1 and {n - 1} (the train split has {n} images), or 0 for the test split"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    val, train = perm[:k], perm[k:]
    return TensorData(data.train_x[train], data.train_y[train], data.train_x[val], data.train_y[val], data.classes)


def statistics(data: TensorData, data_cfg: DictConfig) -> tuple[list[float], list[float]]:
    """data.mean and data.std; null means the train split's own per-channel statistics."""
    x = data.train_x.float().div(255) if data_cfg.mean is None or data_cfg.std is None else None
    mean = list(data_cfg.mean) if data_cfg.mean is not None else x.mean((0, 2, 3)).tolist()
    std = list(data_cfg.std) if data_cfg.std is not None else x.std((0, 2, 3)).tolist()
    if not len(mean) == len(std) == data_cfg.in_chans:
        raise DataError(
            f"data.mean and data.std need one value per channel ({data_cfg.in_chans}), not {len(mean)} and {len(std)}"
        )
    return mean, std
