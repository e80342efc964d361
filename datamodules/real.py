"""DataModules of the real datasets: CIFAR-10, MNIST, Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import torch

from common.errors import ConfigError
from datamodules.base import InMemoryDataModule
from datamodules.cifar10 import load_cifar10
from datamodules.mnist import load_idx_dataset

REAL_DATASETS = ("cifar10", "mnist", "fashion_mnist")


def load_real(name: str, data_dir: Path, download: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_x, train_y, test_x, test_y)`` of a real dataset by name (``REAL_DATASETS``), uint8 images."""
    if name == "cifar10":
        return load_cifar10(data_dir, download=download)
    if name in ("mnist", "fashion_mnist"):
        return load_idx_dataset(name, data_dir)
    raise ConfigError(f"unknown dataset {name!r}; choose one of {list(REAL_DATASETS)}")


class CIFAR10DataModule(InMemoryDataModule):
    """CIFAR-10 (binary or python layout, md5-verified), uint8 in memory, augmented per batch on the device."""

    def __init__(self, *args, download: bool = False, **kwargs) -> None:
        """
        Args:
            download: fetch the python version with torchvision if neither layout is in ``data_dir``.
        """
        super().__init__(*args, **kwargs)
        self.download = download

    def load(self):
        return load_cifar10(self.data_dir, download=self.download)


class MNISTDataModule(InMemoryDataModule):
    """MNIST from IDX files in ``<data_dir>/MNIST/raw`` (plain or .gz). No augmentation by default."""

    def __init__(self, *args, augment: bool = False, **kwargs) -> None:
        super().__init__(*args, augment=augment, **kwargs)

    def load(self):
        return load_idx_dataset("mnist", self.data_dir)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST from ``<data_dir>/FashionMNIST/raw`` or Debian's ``/usr/share/datasets/fashion-mnist``."""

    def load(self):
        return load_idx_dataset("fashion_mnist", self.data_dir)
