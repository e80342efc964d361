"""The constructed datasets released by Ilyas et al. (``d_robust_CIFAR``, ``d_non_robust_CIFAR``,
``drand_CIFAR``, ``ddet_CIFAR``): a folder with ``CIFAR_ims`` and ``CIFAR_lab``, each a ``torch.save``d list
of tensors, concatenated here. Loaded with ``torch.load(weights_only=True)``: plain tensors and lists load,
anything that would need arbitrary unpickling (which can run code) is refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from datamodules.files import DatasetFilesError
from datamodules.real import CIFAR10DataModule

FILES = ("CIFAR_ims", "CIFAR_lab")


class UnsafeFileError(DatasetFilesError):
    """A file needs arbitrary unpickling, which could execute code; it was not loaded."""


def _load_tensors(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(
            f"refusing to load {path}: it is not a plain list of tensors and would need arbitrary unpickling, "
            "which can execute code hidden in the file. The authors' files load safely; this one is different. "
            f"If you trust its origin, convert it yourself to a list of tensors. (torch said: {err})"
        ) from err
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, list | tuple) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return torch.cat([t if t.dim() else t.view(1) for t in obj])
    raise DatasetFilesError(f"{path} holds {type(obj).__name__}, expected a tensor or a list of tensors")


def load_released(folder: str | Path, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images float32 [N, C, H, W] in [0, 1], labels int64 [N])`` of one released dataset folder."""
    folder = Path(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise DatasetFilesError(
            f"{folder} lacks {', '.join(missing)}. Expected a folder of the authors' release (e.g. "
            "d_robust_CIFAR/) holding CIFAR_ims and CIFAR_lab."
        )
    x, y = (_load_tensors(folder / name) for name in FILES)
    if x.dim() != 4 or len(x) != len(y) or y.dim() != 1:
        raise DatasetFilesError(f"{folder}: images {tuple(x.shape)} and labels {tuple(y.shape)} do not match "
                                "([N, C, H, W] and [N])")
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    if x.min() < 0 or x.max() > 1:
        raise DatasetFilesError(f"{folder}: images have values in [{x.min():.3g}, {x.max():.3g}], not [0, 1]")
    if y.is_floating_point() or y.min() < 0 or y.max() >= num_classes:
        raise DatasetFilesError(f"{folder}: labels must be integers in [0, {num_classes}), got {y.dtype} "
                                f"in [{y.min()}, {y.max()}]")
    return x, y.long()


class ReleasedDataModule(CIFAR10DataModule):
    """Train on one of the authors' released constructed datasets; test on the real CIFAR-10 test set."""

    def __init__(self, folder: str, **kwargs) -> None:
        """
        Args:
            folder: the dataset folder (holding ``CIFAR_ims`` and ``CIFAR_lab``); a relative path is looked up
                under ``data_dir`` if it is not found as given.
        """
        super().__init__(**kwargs)
        self.folder = Path(folder)

    def load(self):
        folder = self.folder
        if not folder.is_absolute() and not folder.exists():
            folder = self.data_dir / folder
        x, y = load_released(folder, self.num_classes)
        _, _, test_x, test_y = super().load()
        return x, y, test_x, test_y
