"""Data: the real on-disk formats, the two loaders' equivalence, determinism, sharding, errors."""

import gzip
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image
from scipy.stats import chi2_contingency, chisquare
from torchvision.transforms import v2

from cbam.data import DataError, build_loaders, dataset_classes, sources
from cbam.data.build import hold_out, load_source, make_loaders
from cbam.data.sources import TensorData
from cbam.errors import ConfigError

CPU = torch.device("cpu")


def data_cfg(name: str, *overrides: str):
    return compose_config("model_stats", f"data={name}", *(f"data.{o}" for o in overrides)).data


def run_epoch(loader, epoch: int = 0, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = list(loader.epoch(epoch, skip))
    if skip == 0:  # the advertised sizes are the ones delivered
        assert len(batches) == len(loader)
        assert sum(len(y) for _, y in batches) == loader.num_samples
    return batches


def labels(batches) -> list[int]:
    return torch.cat([y for _, y in batches]).tolist()


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------------------------------------- real formats


def test_fashion_mnist_reads_the_debian_files():
    assert sources._idx_files(sources.FASHION_MNIST_DIRS[0]), "run `make data` (Debian's dataset-fashion-mnist)"
    cfg = data_cfg("fashion_mnist")
    data = load_source(cfg)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.val_x.shape == (10000, 1, 28, 28)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert data.classes[0] == "T-shirt/top" and len(data.classes) == cfg.num_classes == 10
    for y in (data.train_y, data.val_y):
        assert y.min() == 0 and y.max() == 9
        assert torch.bincount(y).tolist() == [len(y) // 10] * 10  # Fashion-MNIST is balanced
    # The config's statistics are the train split's own.
    x = data.train_x.float() / 255
    assert x.mean().item() == pytest.approx(cfg.mean[0], abs=1e-4)
    assert x.std().item() == pytest.approx(cfg.std[0], abs=1e-4)

    train, val = make_loaders(data, cfg, device=CPU, seed=0)
    assert (train.num_samples, len(train)) == (60000 // 128 * 128, 60000 // 128)  # drop_last
    assert (val.num_samples, len(val)) == (10000, 10)
    x, y = next(train.epoch(0))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (128,)


def write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)  # as old as the real files allow


def cifar_images(n: int, rng) -> np.ndarray:
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    # Image 0 marks three pixels: red (0, 0), green (1, 0) and blue (0, 1), each plane 32x32 row-major.
    data[0, 0], data[0, 1024 + 32], data[0, 2048 + 1] = 255, 200, 77
    return data


def assert_cifar(root, name, folder_data, label_key, names, test_labels):
    cfg = data_cfg(name, f"source.root={root}", "batch_size=4", "eval_batch_size=4")
    data = load_source(cfg)
    n_train = sum(len(d["data"]) for d in folder_data["train"])
    assert data.train_x.shape == (n_train, 3, 32, 32) and data.val_x.shape == (len(test_labels), 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.val_y.dtype == torch.int64
    assert data.val_y.tolist() == test_labels
    assert data.train_y.tolist() == sum((d[label_key] for d in folder_data["train"]), [])
    assert (data.train_x[0, 0, 0, 0], data.train_x[0, 1, 1, 0], data.train_x[0, 2, 0, 1]) == (255, 200, 77)
    assert data.classes == names == dataset_classes(cfg)
    train, val = build_loaders(cfg, device=CPU, seed=0)
    assert (train.num_samples, val.num_samples) == (n_train // 4 * 4, len(test_labels))
    assert sorted(labels(run_epoch(val))) == sorted(test_labels)


def test_cifar10_reads_the_python_pickles(tmp_path):
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train = [{"data": cifar_images(3, rng), "labels": rng.integers(0, 10, 3).tolist()} for _ in range(5)]
    test_labels = rng.integers(0, 10, 5).tolist()
    base = tmp_path / "cifar-10-batches-py"
    for i, batch in enumerate(train, 1):
        write_pickle(base / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", **batch})
    write_pickle(base / "test_batch", {"data": cifar_images(5, rng), "labels": test_labels})
    write_pickle(base / "batches.meta", {"label_names": names, "num_cases_per_batch": 3, "num_vis": 3072})
    assert_cifar(tmp_path, "cifar10", {"train": train}, "labels", names, test_labels)
    # Cut short (an extraction interrupted): named, with the fix, not an UnpicklingError traceback.
    test_batch = base / "test_batch"
    test_batch.write_bytes(test_batch.read_bytes()[:100])
    assert_data_error(data_cfg("cifar10", f"source.root={tmp_path}"), f"{test_batch} is not a complete", "delete it")


def test_cifar100_reads_the_python_pickles(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"fine{i}" for i in range(100)]
    train = {"data": cifar_images(10, rng), "fine_labels": rng.integers(0, 100, 10).tolist(), "coarse_labels": [0] * 10}
    test_labels = rng.integers(0, 100, 6).tolist()
    base = tmp_path / "cifar-100-python"
    write_pickle(base / "train", train)
    write_pickle(base / "test", {"data": cifar_images(6, rng), "fine_labels": test_labels, "coarse_labels": [0] * 6})
    write_pickle(base / "meta", {"fine_label_names": names, "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    assert_cifar(tmp_path, "cifar100", {"train": [train]}, "fine_labels", names, test_labels)


def write_image_folder(root, classes=("cat", "dog"), per_class=3):
    rng = np.random.default_rng(0)
    for split, ext in (("train", "png"), ("val", "jpg")):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.{ext}")


def test_imagenet_reads_an_image_folder(tmp_path):
    write_image_folder(tmp_path)
    cfg = data_cfg(
        "imagenet", f"source.root={tmp_path}", "num_classes=2", "num_workers=0", "batch_size=2", "eval_batch_size=4"
    )
    train, val = build_loaders(cfg, device=CPU, seed=0)
    assert train.classes == ["cat", "dog"] and (train.num_samples, val.num_samples) == (6, 6)
    x, y = next(train.epoch(0))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    val_batches = run_epoch(val)
    assert [x.shape for x, _ in val_batches] == [(4, 3, 224, 224), (2, 3, 224, 224)]
    assert labels(val_batches) == [0, 0, 0, 1, 1, 1]
    assert_same_batches(val_batches, run_epoch(val))  # no augmentation in val
    # Val: the standard 0.875 centre crop, 256 for 224, derived from image_size.
    source = load_source(cfg)
    resize = next(t for t in source.val.transform.transforms if isinstance(t, v2.Resize))
    assert resize.size == [256]
    # The workers hand over uint8 images, a quarter of float32's bytes; the loader normalises on the device.
    image, _ = source.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 224, 224)
    mean, std = torch.tensor(cfg.mean)[:, None, None], torch.tensor(cfg.std)[:, None, None]
    first = next(val.epoch(0))[0][0]  # the first val image, normalised
    torch.testing.assert_close(first, (source.val[0][0].float() / 255 - mean) / std)


# ---------------------------------------------------------------------------------------------- the two loaders


def loaders(kind: str, data: TensorData, *overrides: str, name="fashion_mnist", seed=0, rank=0, world_size=1):
    cfg = data_cfg(name, f"loader={kind}", "num_workers=0", *overrides)
    return make_loaders(data, cfg, device=CPU, seed=seed, rank=rank, world_size=world_size)


def one_image_dataset(n: int) -> TensorData:
    image = torch.arange(1, 65, dtype=torch.uint8).reshape(1, 1, 8, 8)  # every crop and flip of it is distinct
    x, y = image.expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.int64)
    return TensorData(x, y, x[:8], y[:8], [str(k) for k in range(10)])  # 10 classes, as fashion_mnist's config


def augmentation_counts(kind: str, pad: int, n: int) -> Counter:
    """How often each (dy, dx, flip) came out, found by matching every sample against all of them."""
    (train, _) = loaders(
        kind, one_image_dataset(n), "image_size=8", f"pad={pad}", "flip=true", "mean=[0]", "std=[1]", "batch_size=100"
    )
    padded = torch.nn.functional.pad(one_image_dataset(1).train_x[0, 0], (pad,) * 4)
    offsets = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (False, True)]
    crops = torch.stack(
        [padded[dy : dy + 8, dx : dx + 8].flip(-1) if f else padded[dy : dy + 8, dx : dx + 8] for dy, dx, f in offsets]
    )
    x = torch.cat([x for x, _ in run_epoch(train)]).mul(255).round().to(torch.uint8)  # back to the stored pixels
    match = (x.flatten(1)[:, None] == crops.flatten(1)[None]).all(-1)  # (n, offsets)
    assert match.sum(1).eq(1).all(), "every sample is exactly one crop-and-flip of the image"
    return Counter(offsets[i] for i in match.int().argmax(1).tolist())


def test_memory_and_torch_loaders_augment_alike():
    pad, n = 2, 3000
    counts = {kind: augmentation_counts(kind, pad, n) for kind in ("memory", "torch")}
    keys = sorted(set(counts["memory"]) | set(counts["torch"]))
    assert len(keys) == 2 * (2 * pad + 1) ** 2  # every offset and both flips occur
    table = np.array([[counts[k][key] for key in keys] for k in ("memory", "torch")])
    for row in table:  # each uniform over the 50 outcomes, as RandomCrop + RandomHorizontalFlip are
        assert chisquare(row).pvalue > 1e-3
    assert chi2_contingency(table).pvalue > 1e-3  # and the two alike
    for axis, values in ((0, range(2 * pad + 1)), (2, (False, True))):  # the marginals, within 5 sigma
        for kind in counts:
            for v in values:
                p = 1 / len(values)
                freq = sum(c for key, c in counts[kind].items() if key[axis] == v)
                assert abs(freq - n * p) < 5 * (n * p * (1 - p)) ** 0.5


def synthetic_data(train_size=300, val_size=70) -> TensorData:
    return sources.synthetic(train_size, val_size, num_classes=10, in_chans=3, image_size=32)


def test_loaders_give_identical_tensors_without_augmentation():
    data = synthetic_data()
    opts = ("pad=0", "flip=false", "batch_size=32", "eval_batch_size=32")
    memory, torch_ = (loaders(kind, data, *opts, name="synthetic") for kind in ("memory", "torch"))
    for a, b in zip(memory, torch_, strict=True):
        assert_same_batches(run_epoch(a, 3), run_epoch(b, 3))


@pytest.mark.parametrize("kind", ["memory", "torch"])
def test_order_and_augmentation_depend_only_on_seed_and_epoch(kind):
    data = synthetic_data()
    train, _ = loaders(kind, data, "batch_size=32", name="synthetic")
    epoch0 = run_epoch(train, 0)
    assert not torch.equal(epoch0[0][0], run_epoch(train, 1)[0][0])
    assert_same_batches(run_epoch(train, 0), epoch0)  # after epoch 1: no state carried over
    assert_same_batches(run_epoch(loaders(kind, data, "batch_size=32", name="synthetic")[0], 0), epoch0)
    assert_same_batches(run_epoch(train, 0, skip=3), epoch0[3:])  # a resumed epoch goes on where it stopped
    assert labels(run_epoch(loaders(kind, data, "batch_size=32", name="synthetic", seed=1)[0], 0)) != labels(epoch0)


def test_torch_loader_augmentation_does_not_depend_on_workers():
    data = synthetic_data()
    train, _ = loaders("torch", data, "batch_size=32", name="synthetic")
    cfg = data_cfg("synthetic", "loader=torch", "num_workers=2", "batch_size=32")
    with_workers, _ = make_loaders(data, cfg, device=CPU, seed=0)
    assert_same_batches(run_epoch(with_workers, 1), run_epoch(train, 1))  # persistent workers after epoch 1...
    assert_same_batches(run_epoch(with_workers, 0, skip=2), run_epoch(train, 0)[2:])  # ...carry nothing over


@pytest.mark.parametrize("kind", ["memory", "torch"])
def test_two_ranks_split_train_disjointly_and_val_exactly_once(kind):
    n_train, n_val = 103, 37
    x = torch.zeros(n_train, 1, 28, 28, dtype=torch.uint8)
    # Labels name the samples: sample i has label i.
    data = TensorData(x, torch.arange(n_train), x[:n_val], torch.arange(n_val), [str(i) for i in range(n_train)])
    opts = (f"num_classes={n_train}", "batch_size=8", "eval_batch_size=8")
    ranks = [loaders(kind, data, *opts, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        train = [labels(run_epoch(train, epoch)) for train, _ in ranks]
        assert len(train[0]) == len(train[1]) == 48  # 51 per rank, cut to whole batches of 8
        assert not set(train[0]) & set(train[1])
    val = [labels(run_epoch(val)) for _, val in ranks]
    assert sorted(val[0] + val[1]) == list(range(n_val))
    assert [v.num_samples for _, v in ranks] == [19, 18]


# ---------------------------------------------------------------------------------------------- synthetic, holdout


def test_synthetic_label_lives_in_its_patch_and_is_learnable():
    cfg = data_cfg("synthetic")
    data = load_source(cfg)
    # The brightest grid cell is the label's patch: the label depends on that one location.
    boxes = [sources.synthetic_patch(k, cfg.num_classes, cfg.image_size) for k in range(cfg.num_classes)]
    brightness = torch.stack(
        [data.val_x[..., t : t + s, left : left + s].float().mean((1, 2, 3)) for t, left, s in boxes]
    )
    assert torch.equal(brightness.argmax(0), data.val_y)  # brightness: (classes, N)

    torch.manual_seed(0)
    train, val = build_loaders(cfg, device=CPU, seed=0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for x, y in train.epoch(0):  # one epoch: 16 steps
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        accuracy = sum((model(x).argmax(1) == y).sum().item() for x, y in val.epoch(0)) / val.num_samples
    assert accuracy > 0.5  # chance: 0.1


def image_bytes(x: torch.Tensor) -> list[bytes]:
    return [bytes(image.numpy()) for image in x]


def test_holdout_takes_val_from_train_the_same_for_every_seed():
    cfg = data_cfg("synthetic", "holdout=200")
    data = load_source(cfg)
    held = hold_out(data, 200)
    train_x, val_x, all_x = (image_bytes(x) for x in (held.train_x, held.val_x, data.train_x))
    assert len(val_x) == 200 and sorted(train_x + val_x) == sorted(all_x)  # a split of train
    assert not set(train_x) & set(val_x)  # noise images: all distinct, so disjoint
    (train, val), (_, val_seed1) = (make_loaders(data, cfg, device=CPU, seed=s) for s in (0, 1))
    assert (train.num_samples, val.num_samples) == ((2048 - 200) // 128 * 128, 200)
    assert_same_batches(run_epoch(val), run_epoch(val_seed1))


# ---------------------------------------------------------------------------------------------- errors


def assert_data_error(cfg, *phrases):
    with pytest.raises(DataError) as e:
        build_loaders(cfg, device=CPU, seed=0)
    assert isinstance(e.value, ConfigError)
    for phrase in phrases:
        assert phrase in str(e.value)


def offline(*args, **kwargs):
    raise OSError("no network")


def test_root_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere"
    assert_data_error(
        data_cfg("fashion_mnist", f"source.root={missing}"), str(missing), "does not exist", "data.source.root"
    )
    assert_data_error(data_cfg("cifar10", f"source.root={missing}"), str(missing), "does not exist")


def test_fashion_mnist_nowhere_names_every_place_and_the_fix(tmp_path, monkeypatch):
    dirs = [tmp_path / "debian", tmp_path / "local"]
    monkeypatch.setattr(sources, "FASHION_MNIST_DIRS", dirs)
    monkeypatch.setattr(sources, "download_url", offline)
    assert_data_error(data_cfg("fashion_mnist"), *map(str, dirs), "no network", "make data", "train-images-idx3-ubyte")


def test_missing_cifar_dir_says_where_it_looked_and_that_the_download_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "download_and_extract_archive", offline)
    assert_data_error(
        data_cfg("cifar10", f"source.root={tmp_path}"),
        str(tmp_path / "cifar-10-batches-py"),
        "data_batch_1",
        "no network",
        "data.source.root",
    )
    assert_data_error(
        data_cfg("cifar100", f"source.root={tmp_path}"),
        str(tmp_path / "cifar-100-python"),
        "{train,test,meta}",
        "no network",
    )


def test_imagenet_errors(tmp_path):
    assert_data_error(data_cfg("imagenet"), "data.source.root is required", "data.source.root=/path/with/train/and/val")
    (tmp_path / "train").mkdir()
    assert_data_error(data_cfg("imagenet", f"source.root={tmp_path}"), str(tmp_path / "val"), "train/<class>")
    write_image_folder(tmp_path / "full")
    full = tmp_path / "full"
    assert_data_error(
        data_cfg("imagenet", f"source.root={full}", "num_classes=2", "loader=memory"),
        "does not fit in memory",
        "data.loader=torch",
    )
    assert_data_error(data_cfg("imagenet", f"source.root={full}"), "2 classes", "data.num_classes=2")


def test_holdout_too_large():
    assert_data_error(data_cfg("synthetic", "holdout=2048"), "data.holdout=2048", "2047")


@pytest.mark.parametrize(
    "override, message",
    [
        ("holdout=0.1", "data.holdout=0.1 must be a whole number of images"),
        ("holdout=-5", "data.holdout=-5 must be a whole number of images"),
        ("pad=-2", "data.pad=-2 must be a whole number of pixels"),
    ],
)
def test_data_options_out_of_range_are_one_clear_error(override, message):
    assert_data_error(data_cfg("synthetic", override), message)


def test_a_folder_dataset_needs_its_statistics_given(tmp_path):
    write_image_folder(tmp_path / "full")
    cfg = data_cfg("imagenet", f"source.root={tmp_path / 'full'}", "num_classes=2", "mean=null")
    assert_data_error(cfg, "data.mean and data.std are computed on load only for datasets held as tensors")


CUTS = {"half": lambda raw: raw[: len(raw) // 2], "empty": lambda raw: b"", "header": lambda raw: raw[:6]}


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("cut", CUTS.values(), ids=CUTS.keys())
def test_an_idx_file_cut_short_is_named_with_the_fix(tmp_path, cut, gz):
    """A download cut short leaves a file of the right name: the error names it (no EOFError traceback)."""
    debian = sources.FASHION_MNIST_DIRS[0]
    for name in sources.FASHION_MNIST_FILES:
        (tmp_path / f"{name}.gz").write_bytes((debian / f"{name}.gz").read_bytes())
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    if gz:
        labels.write_bytes(cut(labels.read_bytes()))
    else:
        raw = gzip.decompress(labels.read_bytes())
        labels.unlink()
        labels = labels.with_suffix("")
        labels.write_bytes(cut(raw))
    assert_data_error(data_cfg("fashion_mnist", f"source.root={tmp_path}"), f"{labels} is not a complete", "delete it")
