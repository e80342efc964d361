"""Determinism that depends on the CPU thread count (docs/DETERMINISM.md).

CPU kernels split their work into one chunk per thread and round the chunk ends differently (GELU's vectorised
body and scalar remainder, per-thread partial sums), so a constructed dataset generated with 2 intra-op threads
can differ in the last bits from one generated with 1. The thread count is therefore part of the cache key and
the manifest, and the DDP ranks of one job must agree on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import write_checkpoint

from datamodules import RelabelByAttack
from datamodules.constructed import ConstructedSet, GenerationJob, GenerationSpec, construct
from models import load_source

N, BATCH = 25, 10  # batches of 10, 10 and a ragged 5 (one per shard)
# The mini configs' numerics: a whitening stem and channels_last. On the AVX-512 development machine 1 and 2 threads
# gave different bytes: examples 4, 9, 14 and 22 (the ends of the threads' chunks of each batch), by up to 6e-8.
SOURCE = {"arch_kwargs": {"widths": [8, 16, 32], "whiten": True}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("source") / "source.ckpt", **SOURCE)


@pytest.fixture(scope="module")
def images(cifar) -> tuple[torch.Tensor, torch.Tensor]:
    return cifar[0][:N], cifar[1][:N]  # real CIFAR-10 training images


@pytest.fixture
def threads():
    """``torch.set_num_threads`` for the test; the previous count is restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def generation(ckpt: Path, images: tuple[torch.Tensor, torch.Tensor], **kw) -> GenerationJob:
    x, y = images
    return GenerationJob(x, y, torch.arange(N), [load_source(ckpt)], RelabelByAttack("random", steps=3),
                         GenerationSpec(batch_size=BATCH, shard_size=BATCH, channels_last=True), progress=False, **kw)


def generate(ckpt: Path, images, cache: Path, threads: int, set_threads) -> ConstructedSet:
    set_threads(threads)
    return construct(generation(ckpt, images), cache)


def test_the_cpu_thread_count_is_part_of_the_cache_key_and_the_manifest(ckpt, images, tmp_path, threads):
    one, two = (generate(ckpt, images, tmp_path, n, threads) for n in (1, 2))
    # Never one cache for both: their bytes may differ in the last bits (examples at the ends of the threads' chunks).
    assert one.directory != two.directory and one.generated == two.generated == N
    assert [s.manifest["numerics"]["intra_op_threads"] for s in (one, two)] == [1, 2]
    assert torch.equal(one.y, two.y)  # the random targets come from the per-example generators
    again = generate(ckpt, images, tmp_path, 1, threads)  # the same count reuses its cache, bit for bit
    assert again.generated == 0 and again.directory == one.directory and torch.equal(again.x, one.x)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(s.directory.name for s in (one, two))


def test_the_thread_count_is_not_in_the_key_of_gpu_generation(ckpt, images, threads):
    gpu = generation(ckpt, images, device=torch.device("cuda"))  # the key is computed without touching a GPU
    keys = []
    for n in (1, 2):
        threads(n)
        keys.append(gpu.description())
    assert keys[0] == keys[1] and "intra_op_threads" not in keys[0]["numerics"]


def _rank(rank: int, init_file: str, ckpt: str, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    if rank == 1:
        # Reported, not set: a forked child must not run a multi-thread OpenMP region (see single_threaded in
        # test_hardening); the engine reads the count through torch.get_num_threads.
        torch.get_num_threads = lambda: 2
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        construct(generation(Path(ckpt), (x, torch.arange(N) % 10)), cache)
        result = {"error": None}
    except Exception as err:  # the parent checks which error each rank got
        result = {"error": type(err).__name__, "message": str(err)}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_ddp_ranks_with_different_thread_counts_are_refused_before_any_work(ckpt, tmp_path):
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_rank, args=(str(tmp_path / "init"), str(ckpt), str(tmp_path / "cache"), str(tmp_path)),
                       nprocs=2, join=True, start_method=method)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in results:  # every rank stops with the same message (none waits at a barrier for the other)
        assert result["error"] == "ConfigError", result
        assert "different CPU thread counts (rank 0: 1, rank 1: 2)" in result["message"]
        assert "Set the same OMP_NUM_THREADS (or torch.set_num_threads) on every rank" in result["message"]
    assert not (tmp_path / "cache").exists()  # refused before anything was generated or written
