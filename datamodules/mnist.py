"""MNIST and Fashion-MNIST from IDX files (plain or .gz), checked against the official content md5."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from datamodules.files import DatasetFilesError, file_hash, missing_dataset_error

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 of the *decompressed* IDX bytes, so plain and gzipped copies (re-compressed by Debian) both check.
CONTENT_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
# Where each dataset is looked for under the data directory, then system-wide (Debian's package).
SUBDIRS = {"mnist": ["MNIST/raw", "mnist"], "fashion_mnist": ["FashionMNIST/raw", "fashion-mnist"]}
SYSTEM_DIRS = {"mnist": [], "fashion_mnist": [Path("/usr/share/datasets/fashion-mnist")]}
FIX = {
    "mnist": "Fix: put the four MNIST IDX files (plain or .gz) in <data_dir>/MNIST/raw.",
    "fashion_mnist": "Fix: `apt-get install dataset-fashion-mnist`, or put the four IDX files in "
    "<data_dir>/FashionMNIST/raw.",
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (magic: two zero bytes, dtype code 0x08 = uint8, number of dimensions, big-endian sizes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DatasetFilesError(f"{path} is not a uint8 IDX file (bad magic number {data[:4].hex()}).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dataset(
    name: str, root: Path, *, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_x [N,1,28,28] uint8, train_y int64, test_x, test_y)`` for ``mnist`` or ``fashion_mnist``."""
    folders = [Path(root) / sub for sub in SUBDIRS[name]] + SYSTEM_DIRS[name]
    stems = [s for pair in SPLITS.values() for s in pair]
    for folder in folders:
        paths = {stem: _find(folder, stem) for stem in stems}
        if all(paths.values()):
            break
    else:
        raise missing_dataset_error(name, folders, f"the IDX files {', '.join(stems)} (plain or .gz)", FIX[name])
    if verify:
        for stem, path in paths.items():
            actual = file_hash(path, decompress=path.suffix == ".gz")
            if actual != CONTENT_MD5[name][stem]:
                raise DatasetFilesError(
                    f"{name}: corrupt {path} (content md5 {actual}, expected {CONTENT_MD5[name][stem]}). {FIX[name]}"
                )
    out = []
    for images, labels in SPLITS.values():
        out.append(torch.from_numpy(read_idx(paths[images]).copy()).unsqueeze(1))
        out.append(torch.from_numpy(read_idx(paths[labels]).astype(np.int64)))
    return tuple(out)
