"""Data: real datasets held in memory, and (later) the constructed datasets generated from checkpoints."""

from datamodules.base import InMemoryDataModule, balanced_subset
from datamodules.files import DATA_DIR_ENV, DatasetFilesError, resolve_data_dir
from datamodules.real import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "DATA_DIR_ENV",
    "DatasetFilesError",
    "FashionMNISTDataModule",
    "InMemoryDataModule",
    "MNISTDataModule",
    "balanced_subset",
    "resolve_data_dir",
]
