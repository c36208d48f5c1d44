"""Data: `build_loaders(cfg.data, ...)` gives (train, val) loaders; the config's `source._target_` picks the reader."""

from .build import build_loaders, build_val_loader, dataset_classes
from .loaders import Loader
from .sources import DataError

__all__ = ["DataError", "Loader", "build_loaders", "build_val_loader", "dataset_classes"]
