"""Constructed datasets: one engine turns source checkpoint(s) and a per-batch recipe into a cached,
sharded, world-size-invariant training set (``engine.py``), stored on disk by ``store.py`` and served by
``ConstructedDataModule`` (``datamodule.py``). The recipes themselves are in ``datamodules/recipes.py``."""

from datamodules.constructed.datamodule import ConstructedDataModule, example_grid
from datamodules.constructed.engine import (
    PRECISIONS,
    ConstructedSet,
    Generation,
    GenerationError,
    construct,
    example_generator,
)
from datamodules.constructed.store import CacheWarning, ShardStore, cache_key

__all__ = [
    "PRECISIONS",
    "CacheWarning",
    "ConstructedDataModule",
    "ConstructedSet",
    "Generation",
    "GenerationError",
    "ShardStore",
    "cache_key",
    "construct",
    "example_generator",
    "example_grid",
]
