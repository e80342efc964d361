"""Section 6: throughput of dataset generation through the suite's own engine (``generate_shard`` of
datamodules/constructed/engine.py, with the recipes of datamodules/constructed/recipes.py), in one process using all
threads against two single-thread processes that each generate their own shards, as two DDP ranks do
(shard i belongs to rank i % 2).

Both runs generate the same shards of the same real CIFAR-10 training images with the same source model, in
fp32 + channels_last (the CPU configs' numerics) with generation seed 0. The engine seeds every example from
its index, so the two results should be bitwise equal: the section checks it with ``torch.equal``.
"""

from __future__ import annotations

import copy
import functools
import queue
import threading
import traceback
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from bench.common import CL, median, round_robin, spread
from datamodules.constructed.engine import GenerationJob, GenerationSpec, generate_shard, shard_ranges
from datamodules.constructed.recipes import Recipe, RelabelByAttack, RepresentationInversion

ONE, TWO = "1 process", "2 processes"
WORLD = 2
Shards = dict[int, dict[str, Tensor]]  # shard index -> the tensors generate_shard returned for it


def recipes(steps: int = 10) -> dict[str, Recipe]:
    """The measured recipes with the mini configs' settings but ``steps``, keyed by dataset. D_rand costs what
    D_det does (only the target rule differs). D_NR / D_R run 20 / 100 inversion steps in the mini configs: 10 keeps
    the section short, and only the two extra forwards per image (goal, statistics) weigh a little more per step."""
    return {"D_rand / D_det": RelabelByAttack(targets="shift", eps=0.5, step_size=0.1, steps=steps),
            "D_R / D_NR": RepresentationInversion(step_size=0.25, steps=steps)}


def generation(x: Tensor, y: Tensor, recipe: Recipe, batch_size: int) -> GenerationJob:
    """The engine's description of the job: one batch per shard, seed 0, fp32, channels_last, no progress bar.
    ``generate_shard`` is given the models directly, so no source checkpoint is needed."""
    spec = GenerationSpec(precision="32-true", batch_size=batch_size, seed=0, channels_last=True,
                          shard_size=batch_size)
    return GenerationJob(x, y, torch.arange(len(y)), sources=[], recipe=recipe, spec=spec, progress=False)


def run_shards(job: GenerationJob, model: nn.Module, shards: list[range], which: list[int]) -> Shards:
    return {i: generate_shard(job, [model], shards[i])[0] for i in which}


def joined(outputs: Shards, key: str) -> Tensor:
    return torch.cat([outputs[i][key] for i in sorted(outputs)])


# ------------------------------------------------------------------------------------- the two processes


def _worker(rank: int, model: nn.Module, x: Tensor, y: Tensor, jobs: list[Recipe], batch_size: int,
            commands, results, barrier) -> None:
    """Generate this rank's shards of recipe i on ("run", i) / its first shard on ("warmup", i), each between
    two barriers; send the last run's output on ("result", i); stop on None."""
    try:
        torch.set_num_threads(1)  # two ranks on two cores: one thread each (more oversubscribes the cores)
        model = model.to(memory_format=CL)  # as generate_missing prepares the models
        generation_jobs = [generation(x, y, recipe, batch_size) for recipe in jobs]
        shards = shard_ranges(len(y), batch_size)
        mine = list(range(rank, len(shards), WORLD))  # the engine's split: shard i belongs to rank i % world
        last: Shards = {}
        while (command := commands.get()) is not None:
            kind, i = command
            if kind == "result":
                results.put((rank, last))
                continue
            barrier.wait()
            last = run_shards(generation_jobs[i], model, shards, mine[:1] if kind == "warmup" else mine)
            barrier.wait()
    except BaseException:
        barrier.abort()  # release the others instead of leaving them waiting for the timeout
        results.put((rank, traceback.format_exc()))
        raise


class TwoProcesses:
    """Two spawned single-thread workers that generate their own shards on command (a context manager)."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, jobs: list[Recipe], batch_size: int,
                 timeout: float = 600.0) -> None:
        ctx = mp.get_context("spawn")  # fork + OpenMP threads can hang (libgomp); spawn starts clean
        self.timeout = timeout
        self.commands = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.barrier = ctx.Barrier(WORLD + 1)  # the two workers and this process
        self.procs = [ctx.Process(target=_worker, daemon=True, name=f"bench-generation-{rank}",
                                  args=(rank, model, x, y, jobs, batch_size, self.commands[rank], self.results,
                                        self.barrier)) for rank in range(WORLD)]
        for p in self.procs:
            p.start()

    def __enter__(self) -> TwoProcesses:
        return self

    def __exit__(self, *exc) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()

    def run(self, recipe_index: int, kind: str = "run") -> None:
        """One round: both workers start at a barrier and meet again at a barrier when both are done."""
        for q in self.commands:
            q.put((kind, recipe_index))
        self._wait()
        self._wait()

    def outputs(self, recipe_index: int) -> Shards:
        """Both workers' shards of their last run, merged."""
        for q in self.commands:
            q.put(("result", recipe_index))
        merged: Shards = {}
        for _ in range(WORLD):
            rank, shards = self.results.get(timeout=self.timeout)
            if isinstance(shards, str):
                raise RuntimeError(f"generation worker {rank} failed:\n{shards}")
            merged.update(shards)
        return merged

    def _wait(self) -> None:
        try:
            self.barrier.wait(self.timeout)
        except threading.BrokenBarrierError as err:
            try:  # a failed worker sends its traceback right after breaking the barrier
                rank, failure = self.results.get(timeout=30)
            except queue.Empty:
                rank, failure = "?", f"no message: timed out after {self.timeout:.0f} s, or died"
            raise RuntimeError(f"generation worker {rank} failed:\n{failure}") from err


# ----------------------------------------------------------------------------------------------- section


def one_process(job: GenerationJob, model: nn.Module, shards: list[range], keep: Shards) -> Callable[[], None]:
    """All shards in this process (all its threads); the output is kept in ``keep``."""
    return lambda: keep.update(run_shards(job, model, shards, list(range(len(shards)))))


def single_thread(job: GenerationJob, model: nn.Module, shards: list[range]) -> Shards:
    """All shards in this process on one thread: the 2-process ranks' numerics (same kernels, same reduction
    order), so their union must equal it bitwise; the 2-thread run may differ in the last bits."""
    previous, out = torch.get_num_threads(), {}
    torch.set_num_threads(1)
    try:
        one_process(job, model, shards, out)()
    finally:
        torch.set_num_threads(previous)
    return out


def summary(recipe: Recipe, images: int, times: dict[str, list[float]], one: Shards, two: Shards,
            single: Shards) -> dict:
    image_steps = images * recipe.steps  # as the engine counts them (manifest image_steps_per_second)
    runs = {name: {"seconds": t, "image_steps_per_s": image_steps / median(t), "spread": spread(t)}
            for name, t in times.items()}
    runs[ONE]["threads"], runs[TWO]["threads"] = torch.get_num_threads(), 1
    x1, x2 = joined(one, "x"), joined(two, "x")
    return {"recipe": recipe.describe(), "images": images, "image_steps": image_steps, **runs,
            "ratio": runs[TWO]["image_steps_per_s"] / runs[ONE]["image_steps_per_s"],
            "identical": torch.equal(x1, x2), "labels_identical": torch.equal(joined(one, "y"), joined(two, "y")),
            "max_abs_difference": float((x1 - x2).abs().max()),
            # The DDP split itself: 2 single-thread ranks against 1 single-thread process.
            "identical_same_threads": torch.equal(joined(single, "x"), x2)
            and torch.equal(joined(single, "y"), joined(two, "y"))}


def generation_section(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, reps: int,
                       steps: int = 10) -> dict:
    """``{dataset: summary}`` for every recipe of ``recipes(steps)``: the same images ``x`` (uint8) / ``y``
    generated by 1 process and by 2 processes, ``reps`` interleaved repetitions after a one-batch warm-up."""
    shards = shard_ranges(len(y), batch_size)
    if len(shards) % WORLD or len(y) % batch_size:
        raise ValueError(f"{len(y)} images must be a multiple of {WORLD} x the batch ({batch_size}): every process "
                         "gets the same number of whole batches")
    # The engine's preparation of a source (eval, no parameter gradients) and of its models (channels_last).
    model = copy.deepcopy(model).eval().requires_grad_(False).to(memory_format=CL)
    measured = recipes(steps)
    results = {}
    with TwoProcesses(model, x, y, list(measured.values()), batch_size) as pool:
        for i, (name, recipe) in enumerate(measured.items()):
            job, one_out = generation(x, y, recipe, batch_size), {}
            runs = {ONE: one_process(job, model, shards, one_out), TWO: functools.partial(pool.run, i)}
            warmups = {ONE: functools.partial(run_shards, job, model, shards, [0]),
                       TWO: functools.partial(pool.run, i, "warmup")}
            times = round_robin(runs, reps, warmups)
            results[name] = summary(recipe, len(y), times, one_out, pool.outputs(i),
                                    single_thread(job, model, shards))
            r = results[name]
            print(f"[generation] {name}: 1 process {r[ONE]['image_steps_per_s']:.1f}, 2 processes "
                  f"{r[TWO]['image_steps_per_s']:.1f} image-steps/s ({r['ratio']:.2f}x), identical to 1 process "
                  f"on 1 thread {'yes' if r['identical_same_threads'] else 'no'}, to 1 process on "
                  f"{r[ONE]['threads']} threads {'yes' if r['identical'] else 'no'}", flush=True)
    return results
