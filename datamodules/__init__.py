"""Data: real datasets held in memory, and the constructed datasets generated from checkpoints."""

from datamodules.base import InMemoryDataModule, balanced_subset
from datamodules.constructed import CacheWarning, ConstructedDataModule, GenerationError
from datamodules.files import DATA_DIR_ENV, DatasetFilesError, resolve_data_dir
from datamodules.real import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule
from datamodules.recipes import NonTransferableAttack, Recipe, RelabelByAttack, RepresentationInversion
from datamodules.released import ReleasedDataModule, UnsafeFileError, load_released

__all__ = [
    "CIFAR10DataModule",
    "CacheWarning",
    "ConstructedDataModule",
    "DATA_DIR_ENV",
    "DatasetFilesError",
    "FashionMNISTDataModule",
    "GenerationError",
    "InMemoryDataModule",
    "MNISTDataModule",
    "NonTransferableAttack",
    "Recipe",
    "RelabelByAttack",
    "ReleasedDataModule",
    "RepresentationInversion",
    "UnsafeFileError",
    "balanced_subset",
    "load_released",
    "resolve_data_dir",
]
