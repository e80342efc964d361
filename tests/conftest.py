"""Shared fixtures. Real data comes from $BOF_DATA_DIR (``.ci/run`` points it at ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The file whose real multi-process launches take about half of the fast suite's time runs first, so that under
# xdist (setup.cfg: one file per worker, in collection order) one worker runs it while the others run the rest.
LONGEST_FIRST = ("test_launch.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, each worker's in-process torch gets its share of the cores, not all of them (subprocess runs
    of the suite already get one thread: tests/helpers.environment)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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
