"""What a reproduction will cost before it runs (``reproduce --dry-run``): floating-point operations per stage,
from each network's forward FLOPs per image (``torch.utils.flop_counter``, counted once per network) times the
images it sees, and the time they imply at a stated device rate.

The model of the work (the suite's, stated so that it can be checked): a training step on one image costs 3
forward passes (forward + backward); an attack or inversion step on one image costs 3 forward passes of every
network it differentiates (forward, backward to the input); an evaluation costs one forward pass. Data loading,
optimiser steps and start-up are left out: the estimate is a floor.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.attack_settings import AUTOATTACK_STEPS, SWEEP_STEPS
from common.datasets import CIFAR10_TEST_SIZE, CIFAR10_TRAIN_SIZE
from pipeline.stages import option_value

CIFAR_TRAIN, CIFAR_TEST = CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE
PASSES_PER_STEP = 3  # forward + backward, in forward-pass units


@functools.cache
def _forward_flops(arch: str, kwargs_json: str, num_classes: int, in_channels: int, side: int) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_model

    model = build_model(arch, num_classes, in_channels, [0.5] * in_channels, [0.25] * in_channels,
                        **json.loads(kwargs_json)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_channels, side, side))
    return int(counter.get_total_flops())


def forward_flops(model_args: Mapping) -> int:
    """Forward FLOPs per image of the network ``model.init_args`` describes (32 x 32 inputs)."""
    return _forward_flops(model_args["arch"], json.dumps(model_args.get("arch_kwargs") or {}, sort_keys=True),
                          int(model_args.get("num_classes", 10)), int(model_args.get("in_channels", 3)), 32)


def _images(limit: int | float | None, batch_size: int, images: int) -> int:
    """Images a loop sees under Lightning's ``limit_*_batches`` (an int: batches; a float: a fraction)."""
    if limit is None:
        return images
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(images, limit * batch_size)
    return int(images * float(limit))


def _callback_args(config: Mapping, name: str) -> Mapping | None:
    return next((c.get("init_args") or {} for c in config["trainer"].get("callbacks") or []
                 if c["class_path"].rsplit(".", 1)[-1] == name), None)


def train_stage_flops(fit: Mapping, tests: int) -> dict[str, float]:
    """FLOPs of a train stage (its parsed fit config): training, the generation of its constructed set (if any;
    the source networks are taken to be of ``source_arch``, else of the student's architecture) and its
    ``tests`` test runs (clean accuracy on the test set, plus the attack sweep of the first)."""
    model, data, trainer = fit["model"]["init_args"], fit["data"]["init_args"], fit["trainer"]
    per_image = forward_flops(model)
    squares = fit["data"]["class_path"].endswith("SquaresDataModule")
    train_images = int(data.get("train_size") or CIFAR_TRAIN)
    seen = _images(trainer.get("limit_train_batches"), int(data.get("batch_size") or 128), train_images)
    adversarial = fit["model"]["class_path"].endswith("AdversarialModule")
    passes = PASSES_PER_STEP * (1 + (int(model.get("steps") or 0) if adversarial else 0))
    cost = {"train": float(seen * int(trainer.get("max_epochs") or 1) * passes * per_image)}
    recipe = (data.get("recipe") or {}).get("init_args")
    if recipe is not None:
        source = forward_flops({**model, "arch": data.get("source_arch") or model["arch"]})
        networks = len(data.get("sources") or [None])
        cost["generation"] = float(train_images * int(recipe.get("steps", 1)) * PASSES_PER_STEP * networks * source)
    test_set = int(data.get("test_size") or 2000) if squares else CIFAR_TEST
    test_images = _images(trainer.get("limit_test_batches"), int(data.get("eval_batch_size") or 500), test_set)
    attacked = 0
    if (robust := _callback_args(fit, "RobustAccuracy")) is not None:
        attacked = len(robust.get("test_points") or []) * int(robust.get("test_steps") or 20) * int(
            robust.get("test_examples") or test_images)
    if (sq := _callback_args(fit, "SquaresRobustness")) is not None:
        attacked = (1 + len(sq.get("sweep") or [])) * int(sq.get("steps") or 20) * int(
            sq.get("sweep_examples") or test_images)
    cost["tests"] = float((tests * test_images + attacked * PASSES_PER_STEP) * per_image)
    return cost


def measure_stage_flops(args: list[str], network_flops: int, attack_steps: int) -> dict[str, float]:
    """FLOPs of a measure stage from its arguments (``transfer ...`` / ``figure3 ...``): every attacked image x
    step x network differentiated; ``attack_steps`` is figure3's (the D_det recipe's)."""
    def last(flag: str, default: int) -> int:
        value = option_value(args, flag)
        return default if value is None else int(value)

    examples = last("--examples", 1000)
    if args[0] == "transfer":
        members = args.index("--fresh") - args.index("--ensemble") - 1
        # Per norm, plain PGD differentiates the target, the non-transferable attack the target and the members.
        passes = 2 * examples * last("--steps", 10) * PASSES_PER_STEP * (1 + 1 + members)
        return {"measure": float(passes * network_flops)}
    def count_after(flag: str, default: int) -> int:  # the values of a multi-valued option
        if flag not in args:
            return default
        after = args[args.index(flag) + 1:]
        return next((i for i, a in enumerate(after) if a.startswith("--")), len(after))

    models = count_after("--model", 0)  # NAME=CKPT values
    if args[0] == "frequency":  # forward passes only: every test image under each Fourier image, per model
        from attacks.fourier import frequencies

        return {"measure": float(examples * len(frequencies(32)) * models * network_flops)}
    if args[0] == "layer_robustness":  # a PGD per layer; counted as whole networks (an upper bound)
        passes = examples * (last("--layers", 4) + 1) * last("--steps", 20) * PASSES_PER_STEP * models
        return {"measure": float(passes * network_flops)}
    if args[0] == "autoattack":
        # A floor, as every figure here: APGD-CE's steps and the PGD baseline on every image. APGD-T, FAB-T and
        # Square (18x those steps and the queries, an image) see only the images still standing, which depends on
        # the model (none for a non-robust one); counting them all made the ETA hours too long.
        radii = count_after("--eps", 2)
        gradient_steps = last("--aa_steps", AUTOATTACK_STEPS) + last("--pgd_steps", SWEEP_STEPS)
        return {"measure": float(examples * radii * models * gradient_steps * PASSES_PER_STEP * network_flops)}
    if args[0] == "inversion":
        return {"measure": float(last("--examples", 50) * last("--steps", 1000) * PASSES_PER_STEP * models
                                 * network_flops)}
    return {"measure": float(examples * attack_steps * PASSES_PER_STEP * network_flops)}


def reproduction_flops(stages: Sequence, out: Path, extra_args: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Per stage of a graph, its FLOPs by part (train, generation, tests, measure), from the commands the
    pipeline would run, parsed by the CLI's own parser (nothing built, no checkpoint read)."""
    from lightning_modules.cli import resolved_config
    from pipeline.stages import commands

    fits: dict[str, dict] = {}
    costs: dict[str, dict[str, float]] = {}
    datasets: set[str] = set()
    for stage in stages:
        steps = dict(commands(stage, out, extra_args))
        if stage.kind == "train":
            # An imported model trains nothing; its first test's config describes its network.
            first = steps.get("fit") or steps[stage.tests[0].label]
            fits[stage.name] = resolved_config(first[2:])
            costs[stage.name] = train_stage_flops(fits[stage.name], tests=len(stage.tests))
            if stage.imported:
                costs[stage.name] = {k: v for k, v in costs[stage.name].items() if k not in ("train", "generation")}
            data = json.dumps(fits[stage.name]["data"], sort_keys=True, default=str)
            if "generation" in costs[stage.name] and data in datasets:
                costs[stage.name]["generation"] = 0.0  # the same constructed set as an earlier stage: cached
            datasets.add(data)
            continue
        args = steps["measure"][3:]  # after python -m pipeline.measure
        # transfer: the target; figure3: the D_det source (the standard model); goh_features: none (linear algebra)
        attacked = stage.deps[0] if stage.deps else None
        network = forward_flops(fits[attacked]["model"]["init_args"]) if attacked in fits else 0
        d_det = ((fits.get("d_det") or {}).get("data", {}).get("init_args", {}).get("recipe") or {})
        costs[stage.name] = measure_stage_flops(args, network, int(d_det.get("init_args", {}).get("steps", 10)))
    return costs


def matmul_rate(seconds: float = 0.5) -> float:
    """This machine's fp32 matrix-multiply rate in FLOP/s (a 1024 x 1024 matmul, repeated for ``seconds``)."""
    import torch

    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * 1024 ** 3 * count / (time.perf_counter() - start)


def human(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops:.0f} FLOP"


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
