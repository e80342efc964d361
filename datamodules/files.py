"""Locating dataset files and checking them against their official checksums."""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import UserError
from common.files import file_hash

DATA_DIR_ENV = "BOF_DATA_DIR"


class DatasetFilesError(UserError, FileNotFoundError):
    """A dataset is missing, incomplete or corrupt; the message says which files and how to fix it."""


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data directory: the argument, else ``$BOF_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get(DATA_DIR_ENV, "data")).expanduser()


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
