"""CIFAR-10 from either official layout, verified against the official md5 of every file.

- ``cifar-10-batches-bin``: the binary version, records of 1 label byte + 3072 pixel bytes (R, G, B planes).
- ``cifar-10-batches-py``: torchvision's python version (pickled dicts), what ``download=True`` fetches.
Both give the same uint8 tensors: images ``[N, 3, 32, 32]`` and int64 labels ``[N]``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from common.errors import ConfigError
from datamodules.files import check_files, missing_dataset_error

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]

BIN_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
PY_MD5 = {  # as listed in torchvision.datasets.CIFAR10
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
FIX = (
    "Fix: point data_dir (or $BOF_DATA_DIR) at the folder that holds cifar-10-batches-bin/ or "
    "cifar-10-batches-py/, or pass download=True when online to fetch the python version with torchvision."
)

Arrays = tuple[torch.Tensor, torch.Tensor]


def read_bin_batch(path: Path) -> Arrays:
    """One file of the binary version."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise ConfigError(f"{path}: size {raw.size} is not a multiple of 3073-byte CIFAR-10 records")
    records = raw.reshape(-1, 3073)
    images = torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(records[:, 0].astype(np.int64))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The python version is a pickle: allow only what numpy arrays need, never arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR-10 batch file")
        return super().find_class(module, name)


def read_py_batch(path: Path) -> Arrays:
    """One file of the python version (a pickled dict with b'data' [N, 3072] and b'labels')."""
    entry = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    data = entry.get("data", entry.get(b"data"))
    labels = entry.get("labels", entry.get(b"labels"))
    images = torch.from_numpy(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return images, torch.tensor(labels, dtype=torch.int64)


def _read_layout(folder: Path, names: list[str], suffix: str, reader, verify: bool, md5: dict) -> tuple:
    if verify:
        check_files(folder, {n + suffix: md5[n + suffix] for n in names}, dataset="CIFAR-10", fix=FIX)
    parts = [reader(folder / (n + suffix)) for n in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def load_cifar10(
    root: Path, *, verify: bool = True, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_x, train_y, test_x, test_y)`` from ``root``, preferring the binary layout if both exist."""
    root = Path(root)
    candidates = [root / "cifar-10-batches-bin", root / "cifar-10-batches-py"]
    if not any(c.is_dir() for c in candidates) and download:
        import torchvision

        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    if candidates[0].is_dir():
        folder, suffix, reader, md5 = candidates[0], ".bin", read_bin_batch, BIN_MD5
    elif candidates[1].is_dir():
        folder, suffix, reader, md5 = candidates[1], "", read_py_batch, PY_MD5
    else:
        raise missing_dataset_error(
            "CIFAR-10", candidates, "data_batch_1..5 and test_batch (.bin in the binary layout)", FIX
        )
    train = _read_layout(folder, TRAIN_FILES, suffix, reader, verify, md5)
    test = _read_layout(folder, TEST_FILES, suffix, reader, verify, md5)
    return (*train, *test)
