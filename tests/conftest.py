"""Shared fixtures. Real data comes from $BOF_DATA_DIR (``.ci/run`` points it at ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data directory; a missing one is an error, never a skip."""
    path = Path(os.environ.get("BOF_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "cifar-10-batches-bin").is_dir() and not (path / "cifar-10-batches-py").is_dir():
        raise RuntimeError(f"real CIFAR-10 not found under {path}: set BOF_DATA_DIR to the shared data folder")
    return path


@pytest.fixture(scope="session")
def cifar(data_dir):
    """The real CIFAR-10 arrays, read once per session."""
    from datamodules.cifar10 import load_cifar10

    return load_cifar10(data_dir)
