"""Data: real datasets held in memory, and the constructed datasets generated from checkpoints."""

from datamodules.base import InMemoryDataModule, balanced_subset
from datamodules.cifar10c import CIFAR10CDataModule
from datamodules.constructed import CacheWarning, ConstructedDataModule, GenerationError
from datamodules.constructed.recipes import (
    NonTransferableAttack,
    Recipe,
    RelabelByAttack,
    RelabelByPrediction,
    RepresentationInversion,
)
from datamodules.files import DATA_DIR_ENV, DatasetFilesError, resolve_data_dir
from datamodules.real import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule
from datamodules.released import ReleasedDataModule, UnsafeFileError, load_released
from datamodules.squares import SquaresDataModule, make_squares

__all__ = [
    "CIFAR10CDataModule",
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
    "RelabelByPrediction",
    "ReleasedDataModule",
    "RepresentationInversion",
    "SquaresDataModule",
    "UnsafeFileError",
    "balanced_subset",
    "load_released",
    "make_squares",
    "resolve_data_dir",
]
