"""Constructed datasets: one engine turns source checkpoint(s) and a per-batch recipe into a cached,
sharded, world-size-invariant training set (``engine.py``), stored on disk by ``store.py`` and served by
``ConstructedDataModule`` (``datamodule.py``). The recipes, what is done to each batch, are in ``recipes.py``."""

from datamodules.constructed.datamodule import ConstructedDataModule, example_grid
from datamodules.constructed.engine import (
    PRECISIONS,
    ConstructedSet,
    GenerationError,
    GenerationJob,
    GenerationSpec,
    construct,
    example_generator,
)
from datamodules.constructed.store import CacheWarning, ShardStore, cache_key

__all__ = [
    "PRECISIONS",
    "CacheWarning",
    "ConstructedDataModule",
    "ConstructedSet",
    "GenerationError",
    "GenerationJob",
    "GenerationSpec",
    "ShardStore",
    "cache_key",
    "construct",
    "example_generator",
    "example_grid",
]
