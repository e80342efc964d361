"""The generation engine: shards over ranks, per-example seeds, the NaN guard, the content-addressed cache.

``construct(generation, cache_dir)`` returns the whole constructed training set on every rank:
1. every rank checks the shards it owns (shard i belongs to rank i % world); if some are missing or damaged
   it checks that the cache directory is writable and has room for them (before any work), then generates
   them batch by batch, each under its shard lock and written atomically as soon as it is done (so a killed
   run resumes, and another job asking for the same set waits for that shard and reuses it, see store.py);
2. barrier; rank 0 writes the manifest (last, under its lock) from the shards' records;
3. barrier; every rank loads every shard, checking its sha256 against the manifest.
Each example's randomness comes from a generator seeded with (seed, original index), and shards and batches
are fixed by the config, so the bytes do not depend on the number of processes or on interruptions (measured
on CPU in fp32: nor on the thread count; GPU kernels may need ``torch.use_deterministic_algorithms``).
If one rank fails (e.g. the NaN guard), the others wait at the barrier until the launcher stops them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import Progress

from datamodules.base import as_float_images, world_info
from datamodules.constructed.sources import Source
from datamodules.constructed.store import CacheWarning, ShardStore, cache_key, tensor_sha256
from datamodules.files import check_output_dir
from datamodules.recipes import Batch, Recipe, RecipeOutput

PRECISIONS = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
SPACE_MARGIN = 1.05, 64 << 20  # free space asked for beyond the estimate: 5% plus 64 MiB (logs, other writers)

__all__ = ["CacheWarning", "ConstructedSet", "Generation", "GenerationError", "construct", "example_generator"]


class GenerationError(RuntimeError):
    """The recipe produced unusable output (NaN / inf, wrong shapes); nothing of the batch was written."""


def example_generator(seed: int, index: int) -> torch.Generator:
    """The private random stream of one example: a CPU generator seeded from (seed, original index)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def shard_ranges(n: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclass
class Generation:
    """Everything that determines a constructed dataset (all of it enters the cache key but ``device`` and
    ``progress``, which only say where and how visibly it runs)."""

    x: torch.Tensor  # the training images to construct from (CPU; uint8, or float in [0, 1])
    y: torch.Tensor  # their true labels
    indices: torch.Tensor  # their indices in the original training set (seeds, bookkeeping)
    sources: list[Source]
    recipe: Recipe
    num_classes: int = 10
    seed: int = 0
    precision: str = "32-true"
    batch_size: int = 250  # part of the key: kernels may round differently at another batch size
    shard_size: int = 1000
    channels_last: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {sorted(PRECISIONS)}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be positive")
        if not len(self.x) == len(self.y) == len(self.indices) > 0:
            raise ValueError("x, y and indices must be non-empty and have the same length")

    def description(self) -> dict:
        """The key material: source contents, recipe, data, seed and numerics."""
        return {
            "sources": [s.sha256 for s in self.sources],
            "recipe": self.recipe.describe(),
            "data_sha256": tensor_sha256(self.x, self.y),  # the clean images and labels constructed from
            "indices_sha256": tensor_sha256(self.indices),  # which training examples they are
            "num_classes": self.num_classes,
            "seed": self.seed,
            "numerics": {"precision": self.precision, "device_type": self.device.type,
                         "channels_last": self.channels_last},
            "batch_size": self.batch_size,
            "shard_size": self.shard_size,
        }

    def batch(self, positions: torch.Tensor) -> Batch:
        return Batch(
            x=as_float_images(self.x[positions]).to(self.device),
            y=self.y[positions].to(self.device),
            indices=self.indices[positions],
            positions=positions,
            generators=[example_generator(self.seed, int(i)) for i in self.indices[positions]],
            pool=self.x,
            num_classes=self.num_classes,
            autocast_dtype=PRECISIONS[self.precision],
            channels_last=self.channels_last,
        )


@dataclass
class ConstructedSet:
    """A constructed training set, with where each example came from."""

    x: torch.Tensor  # float32 images in [0, 1]
    y: torch.Tensor  # labels to train on
    label: torch.Tensor  # the original (true) labels
    index: torch.Tensor  # indices in the original training set
    stats: dict[str, torch.Tensor]  # per-example statistics of the recipe
    manifest: dict
    directory: Path
    generated: int = 0  # examples generated (not loaded from the cache) by this process in this run


def check_output(out: RecipeOutput, batch: Batch) -> None:
    """Refuse NaN / inf images or statistics (naming the examples) and malformed output."""
    b = len(batch.y)
    if out.x.shape != batch.x.shape or out.y.shape != (b,) or any(v.shape != (b,) for v in out.stats.values()):
        raise GenerationError(f"recipe output shapes x {tuple(out.x.shape)}, y {tuple(out.y.shape)}, stats "
                              f"{ {k: tuple(v.shape) for k, v in out.stats.items()} } do not match the batch ({b})")
    bad = ~torch.isfinite(out.x.flatten(1)).all(dim=1)
    for value in out.stats.values():
        bad |= ~torch.isfinite(value)
    if bad.any():
        raise GenerationError(
            f"non-finite values (NaN/inf) generated for training examples {batch.indices[bad.cpu()].tolist()} "
            f"(original indices) in the batch {batch.indices[0].item()}..{batch.indices[-1].item()}; nothing "
            "was written. Check the source checkpoint and the numerics (try generation_precision: 32-true)."
        )


def generate_shard(gen: Generation, models: list, shard: range, advance: Callable[[], None] = lambda: None
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of one shard and its record (size, timing, statistic sums); ``advance`` after each batch."""
    started = time.perf_counter()
    outputs = []
    for positions in torch.arange(shard.start, shard.stop).split(gen.batch_size):
        batch = gen.batch(positions)
        out = gen.recipe(models, batch)
        check_output(out, batch)
        outputs.append(RecipeOutput(out.x.detach().float().cpu(), out.y.cpu(),
                                    {k: v.detach().float().cpu() for k, v in out.stats.items()}))
        advance()
    positions = torch.arange(shard.start, shard.stop)
    stats = {k: torch.cat([o.stats[k] for o in outputs]) for k in outputs[0].stats}
    tensors = {"x": torch.cat([o.x for o in outputs]), "y": torch.cat([o.y for o in outputs]).long(),
               "label": gen.y[positions].long(), "index": gen.indices[positions].long(),
               **{f"stat.{k}": v for k, v in stats.items()}}
    seconds = time.perf_counter() - started
    info = {"examples": len(positions), "seconds": seconds, "image_steps": len(positions) * gen.recipe.steps,
            "stat_sums": {k: float(v.double().sum()) for k, v in stats.items()}}
    return tensors, info


def make_manifest(gen: Generation, description: dict, key: str, infos: list[dict]) -> dict:
    n = sum(i["examples"] for i in infos)
    seconds = sum(i["seconds"] for i in infos)
    steps = sum(i["image_steps"] for i in infos)
    stats = {k: sum(i["stat_sums"][k] for i in infos) / n for k in infos[0]["stat_sums"]}
    return {
        "key": key,
        **description,
        "sources": [s.describe() for s in gen.sources],
        "examples": n,
        "shards": [{k: i[k] for k in ("file", "sha256", "examples", "bytes")} for i in infos],
        "bytes": sum(i["bytes"] for i in infos),
        "stats": stats,
        "generation_seconds": seconds,  # summed over shards (device-seconds), including resumed runs
        "image_steps_per_second": steps / seconds if seconds > 0 else None,
        "torch_version": torch.__version__,
    }


def estimated_bytes(gen: Generation, examples: int) -> int:
    """Disk space ``examples`` constructed examples need: float32 images, three int64 fields, the statistics."""
    return examples * (gen.x[0].numel() * 4 + 3 * 8 + 16 * 4)


def preflight(gen: Generation, store: ShardStore, shards: list[range], todo: list[int]) -> None:
    """Fail before any generation work if the cache directory is unwritable or too full for the shards still
    to write: ours (``todo``) and those of other ranks not recorded yet (they share the disk)."""
    ours = set(todo)
    missing = sum(len(s) for i, s in enumerate(shards) if i in ours or not store.info_path(i).is_file())
    factor, extra = SPACE_MARGIN
    check_output_dir(store.dir, int(estimated_bytes(gen, missing) * factor) + extra,
                     what=f"the constructed dataset ({missing} examples still to generate)",
                     fix="Make it writable or free space on its disk, or pass cache_dir=<a writable directory on a "
                         "disk with room, shared by all ranks> (data.init_args.cache_dir in a config).")


def generate_missing(gen: Generation, store: ShardStore, shards: list[range], todo: list[int], rank: int) -> int:
    """Generate the shards ``todo`` unless another process finishes them first; the examples generated here.

    Shards whose lock is free are done first; those another job is generating are waited for afterwards and
    then reused (or generated, if that job died)."""
    models = [s.model.to(gen.device) for s in gen.sources]
    if gen.channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    generated = 0
    batches = {i: -(-len(shards[i]) // gen.batch_size) for i in todo}
    with Progress(disable=not gen.progress or rank != 0) as progress:
        task = progress.add_task(f"generating {store.dir.name}", total=sum(batches.values()))

        def ensure(i: int) -> int:  # call with shard i's lock held
            if store.finished_shard(i) is not None:  # another process finished it meanwhile
                progress.advance(task, batches[i])
                return 0
            tensors, info = generate_shard(gen, models, shards[i], lambda: progress.advance(task))
            store.write_shard(i, tensors, {**info, "rank": rank})
            return len(shards[i])

        busy = []
        for i in todo:
            lock = store.shard_lock(i)
            if not lock.acquire(blocking=False):
                busy.append(i)
                continue
            try:
                generated += ensure(i)
            finally:
                lock.release()
        for i in busy:
            with store.shard_lock(i):
                generated += ensure(i)
    return generated


def construct(gen: Generation, cache_dir: str | Path) -> ConstructedSet:
    """Generate (or load from the cache) the constructed set; see the module docstring."""
    description = gen.description()
    key = cache_key(description)
    store = ShardStore(Path(cache_dir) / f"{gen.recipe.name}-{key}")
    rank, world = world_info()
    shards = shard_ranges(len(gen.y), gen.shard_size)
    # No warnings yet: another job may be writing some of these shards; they are checked again under the lock.
    todo = [i for i in range(rank, len(shards), world) if store.finished_shard(i, warn=False) is None]
    generated = 0
    if todo:
        preflight(gen, store, shards, todo)
        generated = generate_missing(gen, store, shards, todo, rank)
    barrier()
    if rank == 0:  # every shard was verified or written by its owner; load() checks the bytes again
        infos = [store.record(i) for i in range(len(shards))]
        if any(info is None for info in infos):
            raise RuntimeError(f"shards missing in {store.dir} after generation (is cache_dir shared by all ranks?)")

        def current(manifest: dict | None) -> bool:
            return manifest is not None and [s["sha256"] for s in manifest.get("shards", [])] == [
                i["sha256"] for i in infos]

        if not current(store.read_manifest()):
            with store.lock("manifest"):
                if not current(store.read_manifest(warn=False)):  # another job may have written it meanwhile
                    store.write_manifest(make_manifest(gen, description, key, infos))
        store.sweep_locks()  # a killed run leaves its lock files behind
    barrier()
    return load(store, generated=generated)


def load(store: ShardStore, generated: int = 0) -> ConstructedSet:
    """Every shard of a finished cache directory, verified against its manifest, filled into one tensor per
    field (peak memory: the dataset plus one shard)."""
    manifest = store.read_manifest()
    if manifest is None:
        raise RuntimeError(f"{store.dir} has no manifest")
    fields: dict[str, torch.Tensor] = {}
    start = 0
    for i, shard in enumerate(manifest["shards"]):
        part = store.read_shard(i, shard["sha256"])
        if not fields:
            fields = {k: v.new_empty((manifest["examples"], *v.shape[1:])) for k, v in part.items()}
        for k, v in part.items():
            fields[k][start : start + len(v)] = v
        start += shard["examples"]
    stats = {k[len("stat."):]: v for k, v in fields.items() if k.startswith("stat.")}
    return ConstructedSet(fields["x"], fields["y"], fields["label"], fields["index"], stats, manifest, store.dir,
                          generated)
