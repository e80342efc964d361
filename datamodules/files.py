"""Locating dataset files and checking them against their official checksums."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

DATA_DIR_ENV = "BOF_DATA_DIR"


class DatasetFilesError(FileNotFoundError):
    """A dataset is missing, incomplete or corrupt; the message says which files and how to fix it."""


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data directory: the argument, else ``$BOF_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get(DATA_DIR_ENV, "data")).expanduser()


def file_hash(path: Path, algorithm: str = "md5", *, decompress: bool = False) -> str:
    """Hex digest of a file's bytes (of its decompressed bytes if ``decompress``), read in chunks."""
    digest = hashlib.new(algorithm)
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(folder: Path, expected_md5: dict[str, str], *, dataset: str, fix: str) -> None:
    """Raise one DatasetFilesError listing every missing or corrupt file in ``folder``."""
    problems = []
    for name, md5 in expected_md5.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"missing {name}")
        elif (actual := file_hash(path)) != md5:
            problems.append(f"corrupt {name} (md5 {actual}, expected {md5})")
    if problems:
        raise DatasetFilesError(
            f"{dataset}: {'; '.join(problems)} in {folder}. Expected files: {', '.join(expected_md5)}. {fix}"
        )


def missing_dataset_error(dataset: str, searched: list[Path], expected: str, fix: str) -> DatasetFilesError:
    where = ", ".join(str(p) for p in searched)
    return DatasetFilesError(f"{dataset} not found. Searched: {where}. Expected {expected}. {fix}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, then rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
