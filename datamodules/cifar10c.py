"""CIFAR-10-C (Hendrycks & Dietterich): the CIFAR-10 test set under one corruption at one severity (SPEC 5.4).

From the published files when the user has them (``<folder>/<corruption>.npy``: 50,000 uint8 images, 32 x 32 x 3,
10,000 per severity 1..5, and ``<folder>/labels.npy``), read with ``allow_pickle=False``; otherwise fog and
contrast are generated from the real test set (``datamodules/corruptions.py``), the other corruptions need the files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.datasets import CIFAR10_TEST_SIZE
from common.errors import ConfigError
from datamodules.corruptions import CORRUPTIONS, check_severity
from datamodules.files import DatasetFilesError
from datamodules.real import CIFAR10DataModule

CIFAR10C = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
            "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
            "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate")
PER_SEVERITY = CIFAR10_TEST_SIZE
DOWNLOAD = "https://zenodo.org/record/2535967 (CIFAR-10-C.tar)"


def read_cifar10c(folder: Path, corruption: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One severity of a CIFAR-10-C file (severities 1..5 in order): uint8 images ``[N, 3, 32, 32]`` and int64
    labels (N = 10,000 in CIFAR-10-C)."""
    images_path, labels_path = folder / f"{corruption}.npy", folder / "labels.npy"
    try:
        images = np.load(images_path, mmap_mode="r", allow_pickle=False)
        labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetFilesError(f"cannot read CIFAR-10-C's {images_path} / {labels_path} ({err}); download "
                                f"{DOWNLOAD} again") from err
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(images) % 5
            or labels.shape != (len(images),)):
        raise DatasetFilesError(f"{images_path}: expected uint8 images of shape (5 x N, 32, 32, 3) and as many labels "
                                f"(CIFAR-10-C: N = {PER_SEVERITY}), got {images.dtype} {images.shape} and "
                                f"{labels.shape}; download {DOWNLOAD} again")
    per_severity = len(images) // 5
    part = slice((severity - 1) * per_severity, severity * per_severity)
    x = torch.from_numpy(np.ascontiguousarray(images[part])).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(labels[part].astype(np.int64))


def corrupted(x: torch.Tensor, corruption: str, severity: int, seed: int = 0, batch: int = 1000,
              indices: Sequence[int] | None = None) -> torch.Tensor:
    """uint8 images ``x`` under a corruption the suite generates, as uint8. ``indices``: each image's index in the
    test set (default: x is the whole test set), so a subset is corrupted exactly as in the whole set."""
    indices = list(range(len(x)) if indices is None else indices)
    out = []
    for start in range(0, len(x), batch):
        part = CORRUPTIONS[corruption](x[start:start + batch].double() / 255, severity, seed=seed,
                                       indices=indices[start:start + batch])
        out.append((part * 255).round().to(torch.uint8))
    return torch.cat(out)


class CIFAR10CDataModule(CIFAR10DataModule):
    """CIFAR-10 with its test (and validation) set replaced by a CIFAR-10-C corruption; training data unchanged."""

    def __init__(self, *args, corruption: str = "fog", severity: int = 5, folder: str | None = None,
                 corruption_seed: int = 0, test_indices: Sequence[int] | None = None, **kwargs) -> None:
        """
        Args:
            corruption: a CIFAR-10-C corruption (``fog``, ``contrast``, ``gaussian_noise``, ...).
            severity: 1..5.
            folder: the CIFAR-10-C folder (``<corruption>.npy``, ``labels.npy``); None or without the file: fog and
                contrast are generated from the real test set, any other corruption is an error.
            corruption_seed: seed of the generated corruptions' randomness (fog's fractals), per image.
            test_indices: only these test images (indices into the test set), each corrupted exactly as in the
                whole set; None: the whole test set.
        """
        super().__init__(*args, **kwargs)
        if corruption not in CIFAR10C:
            raise ConfigError(f"unknown corruption {corruption!r}; choose one of {list(CIFAR10C)}; fix "
                              "data.init_args.corruption")
        try:
            check_severity(severity)
        except ValueError as err:
            raise ConfigError(f"{err}; fix data.init_args.severity") from err
        self.folder = Path(folder) if folder else None
        if corruption not in CORRUPTIONS and not self.has_files(corruption):
            raise ConfigError(f"{corruption} needs the CIFAR-10-C files (the suite generates only "
                              f"{sorted(CORRUPTIONS)}): download {DOWNLOAD} and set data.init_args.folder")
        self.corruption, self.severity, self.corruption_seed = corruption, severity, corruption_seed
        self.test_indices = None if test_indices is None else [int(i) for i in test_indices]

    def has_files(self, corruption: str) -> bool:
        return self.folder is not None and (self.folder / f"{corruption}.npy").is_file()

    def load(self):
        train_x, train_y, test_x, test_y = super().load()
        if self.has_files(self.corruption):
            test_x, test_y = read_cifar10c(self.folder, self.corruption, self.severity)
        keep = self.test_indices
        if keep is not None:
            if keep and not 0 <= min(keep) <= max(keep) < len(test_y):
                raise ConfigError(f"test_indices must lie in [0, {len(test_y)}); fix data.init_args.test_indices")
            test_x, test_y = test_x[keep], test_y[keep]
        if not self.has_files(self.corruption):
            test_x = corrupted(test_x, self.corruption, self.severity, self.corruption_seed, indices=keep)
        return train_x, train_y, test_x, test_y
