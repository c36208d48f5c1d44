"""Dataset readers. A data config's `source._target_` names one; each returns both splits and the class names.

Small datasets come back as tensors (the memory loader keeps them on the device); ImageNet comes back
as ImageFolder datasets with their per-image transforms.
"""

import gzip
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive, download_url
from torchvision.transforms import v2

from cbam.errors import ConfigError


class DataError(ConfigError):
    """Bad input about data: a missing dataset, a root that does not exist, a bad data option."""


@dataclass
class TensorData:
    """A dataset small enough to hold whole: images uint8 (N, C, H, W), labels int64 (N,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]


@dataclass
class FolderData:
    """Datasets read image by image, each item (transformed image, label)."""

    train: Dataset
    val: Dataset
    classes: list[str]


def _existing_dir(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.source.root={root} does not exist: point it at the dataset's directory")
    return root


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
# Debian's dataset-fashion-mnist installs the files here; elsewhere they are downloaded to the second dir.
FASHION_MNIST_DIRS = [Path("/usr/share/datasets/fashion-mnist"), Path("data/fashion_mnist")]


def _idx_files(folder: Path) -> list[Path] | None:
    """The four IDX files in `folder`, each gzipped or not; None unless all four are there."""
    found = [next((p for p in (folder / f"{f}.gz", folder / f) if p.is_file()), None) for f in FASHION_MNIST_FILES]
    return None if None in found else found


def _read_idx(path: Path) -> torch.Tensor:
    """IDX, the MNIST file format: magic 0x00 0x00 0x08 (uint8) <ndim>, ndim big-endian int32 sizes, the data.

    Not torchvision's read_sn3_pascalvincent_tensor: it opens only uncompressed files (Debian ships .gz)
    and asserts on a truncated one, where this says which file to fetch again.
    """
    incomplete = DataError(f"{path} is not a complete uint8 IDX file: delete it so that it is fetched again")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile):  # a download cut short, a file that is not gzip
        raise incomplete from None
    ndim = raw[3] if len(raw) > 3 else 0
    if raw[:3] != b"\x00\x00\x08" or ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise incomplete
    shape = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    if len(raw) != 4 + 4 * ndim + math.prod(shape):
        raise incomplete
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(shape)


def fashion_mnist(root: str | None = None) -> TensorData:
    dirs = [_existing_dir(root)] if root is not None else []
    dirs += FASHION_MNIST_DIRS
    files = next(filter(None, map(_idx_files, dirs)), None)
    if files is None:
        download_dir = FASHION_MNIST_DIRS[-1]
        try:
            for name, md5 in datasets.FashionMNIST.resources:
                download_url(datasets.FashionMNIST.mirrors[0] + name, str(download_dir), md5=md5)
        except Exception as e:  # no network, proxy, disk: the message below says what to do about any of them
            looked = ", ".join(str(d.resolve()) for d in dirs)
            raise DataError(
                f"Fashion-MNIST not found (looked in {looked}) and downloading it to {download_dir.resolve()} failed "
                f"({e}): run `make data` (installs Debian's dataset-fashion-mnist) or put the four IDX files "
                f"({', '.join(FASHION_MNIST_FILES)}, .gz or not) in {download_dir.resolve()} or in data.source.root"
            ) from None
        files = _idx_files(download_dir)
    train_x, train_y, val_x, val_y = map(_read_idx, files)
    # (N, 28, 28) -> (N, 1, 28, 28)
    return TensorData(train_x[:, None], train_y.long(), val_x[:, None], val_y.long(), FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------- CIFAR


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="latin1")  # the files were pickled by Python 2
    except (pickle.UnpicklingError, EOFError, ValueError) as e:  # cut short while extracted, or not a pickle
        raise DataError(f"{path} is not a complete CIFAR pickle ({e}): delete it so that it is fetched again") from None


def _cifar(
    root: str | None, tv_class, *, folder: str, train: list[str], test: str, labels: str, meta: str, names: str
) -> TensorData:
    """torchvision's layout, `<root>/<folder>/{train files, test file, meta file}`, downloaded with it if missing.

    tv_class: torchvision's dataset class, for its download URL only; labels, names: the pickles' keys.
    Not torchvision's CIFAR10/CIFAR100 readers: they refuse every file whose md5 differs from the official
    archive's (a subset, a re-pickled copy, the tests' small files in the same format).
    """
    root = _existing_dir(root) if root is not None else Path("data")
    base = root / folder
    expected = [*train, test, meta]
    if not all((base / f).is_file() for f in expected):
        try:
            download_and_extract_archive(tv_class.url, str(root), filename=tv_class.filename, md5=tv_class.tgz_md5)
        except Exception as e:  # no network, proxy, disk: the message below says what to do about any of them
            raise DataError(
                f"{base.resolve()}/{{{','.join(expected)}}} not found and downloading {tv_class.url} failed ({e}): "
                f"extract that archive (the python version) under {root.resolve()}, "
                f"or set data.source.root to the directory that holds {folder}/"
            ) from None

    def split(files):
        batches = [_unpickle(base / f) for f in files]
        x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])  # (N, 3072)
        y = np.concatenate([np.asarray(b[labels], dtype=np.int64) for b in batches])  # (N,)
        # Each row is the R, G and B planes one after the other, each 32x32 row-major.
        return torch.from_numpy(x).reshape(-1, 3, 32, 32), torch.from_numpy(y)

    return TensorData(*split(train), *split([test]), list(_unpickle(base / meta)[names]))


def cifar10(root: str | None = None) -> TensorData:
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar(
        root, datasets.CIFAR10, folder="cifar-10-batches-py", train=train, test="test_batch",
        labels="labels", meta="batches.meta", names="label_names",
    )  # fmt: skip


def cifar100(root: str | None = None) -> TensorData:
    return _cifar(
        root, datasets.CIFAR100, folder="cifar-100-python", train=["train"], test="test",
        labels="fine_labels", meta="meta", names="fine_label_names",  # the 100 fine classes, not the 20 coarse
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- ImageNet

IMAGENET_LAYOUT = (
    "data.source.root must hold train/<class>/<image> and val/<class>/<image> (val sorted into the same class folders)"
)


def _image_folder(folder: Path, transform) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise DataError(f"{e}: {IMAGENET_LAYOUT}") from None


def imagenet(root: str | None, image_size: int) -> FolderData:
    """Images come out of the workers as uint8 (N, 3, S, S): a quarter of float32's bytes through shared
    memory, pinning and the copy; the loader normalises them on the device."""
    if root is None:
        raise DataError(
            "data.source.root is required for imagenet: "
            "python train.py data=imagenet data.source.root=/path/with/train/and/val"
        )
    root = _existing_dir(root)
    missing = [str(root / split) for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise DataError(f"{' and '.join(missing)} not found: {IMAGENET_LAYOUT}")
    train = _image_folder(
        root / "train", v2.Compose([v2.RandomResizedCrop(image_size), v2.RandomHorizontalFlip(), v2.ToImage()])
    )
    # The standard 0.875 centre crop: the short side resized to 256 for a 224 crop.
    val = _image_folder(
        root / "val", v2.Compose([v2.Resize(round(image_size / 0.875)), v2.CenterCrop(image_size), v2.ToImage()])
    )
    if val.classes != train.classes:
        raise DataError(
            f"{root / 'val'} has {len(val.classes)} class folders and {root / 'train'} {len(train.classes)}, "
            f"not the same ones: {IMAGENET_LAYOUT}"
        )
    return FolderData(train, val, train.classes)


# ---------------------------------------------------------------------------------------------- synthetic


def synthetic_patch(label: int, num_classes: int, image_size: int) -> tuple[int, int, int]:
    """(top, left, size) of class `label`'s patch: cell `label` of a ceil(sqrt(num_classes))-square grid.

    The patch is the only part of a synthetic image that carries its label (what a Grad-CAM test looks for).
    """
    cells = math.ceil(math.sqrt(num_classes))
    size = image_size // cells
    if size == 0:
        raise DataError(
            f"data.image_size={image_size} is too small for {num_classes} synthetic class patches: use >= {cells}"
        )
    return label // cells * size, label % cells * size, size


def synthetic(
    train_size: int, val_size: int, num_classes: int, in_chans: int, image_size: int, seed: int = 0
) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    # One template per class: black except its own patch, a fixed random texture in [96, 160). Where the
    # patch is and what it looks like both give the class; the rest of the image is noise in [0, 96).
    templates = torch.zeros(num_classes, in_chans, image_size, image_size, dtype=torch.uint8)  # (K, C, S, S)
    for k in range(num_classes):
        top, left, size = synthetic_patch(k, num_classes, image_size)
        patch = torch.randint(96, 160, (in_chans, size, size), generator=g, dtype=torch.uint8)
        templates[k, :, top : top + size, left : left + size] = patch

    def split(n):
        y = torch.randint(num_classes, (n,), generator=g)  # (n,)
        noise = torch.randint(96, (n, in_chans, image_size, image_size), generator=g, dtype=torch.uint8)
        return noise + templates[y], y  # at most 95 + 159: no uint8 overflow

    return TensorData(*split(train_size), *split(val_size), [str(k) for k in range(num_classes)])
