"""Tensor helpers every layer uses: image dtype, the process's place in a DDP job, and per-rank counts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images (constructed datasets) pass through as float32."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def world_info() -> tuple[int, int]:
    """(rank, world size) of the current process; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """This rank's part of each tensor: contiguous and unpadded (``tensor_split``), so the ranks' parts are
    disjoint and together hold every example exactly once."""
    rank, world = world_info()
    return [t.tensor_split(world)[rank] for t in tensors]


def rank_subset(*tensors: torch.Tensor, limit: int | None = None, seed: int | None = None) -> list[torch.Tensor]:
    """This rank's part (:func:`rank_slice`) of ``limit`` aligned examples of ``tensors``: the first ``limit``,
    or with ``seed`` a seeded random choice of ``limit`` kept in their original order; all of them when ``limit``
    is None or not below their number. Every rank chooses the same examples, so the parts stay disjoint."""
    n = len(tensors[0])
    if limit is not None and limit < n:
        if seed is None:
            tensors = tuple(t[:limit] for t in tensors)
        else:
            keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
            tensors = tuple(t[keep] for t in tensors)
    return rank_slice(*tensors)


def summed_fractions(strategy: Any, counts: Sequence[float], sizes: Sequence[int],
                     device: torch.device | str = "cpu") -> list[float]:
    """``sum(counts[i]) / sum(sizes[i])`` over the ranks of ``strategy`` (a Lightning strategy: its ``reduce``
    sums across processes, and is the identity on one). With :func:`rank_slice` parts this equals the single-device
    number exactly. NaN where no rank has an example."""
    totals = torch.tensor([[float(c), float(n)] for c, n in zip(counts, sizes, strict=True)], dtype=torch.float64,
                          device=device)
    totals = strategy.reduce(totals, reduce_op="sum").tolist()
    return [c / n if n else math.nan for c, n in totals]
