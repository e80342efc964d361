"""Dataset generation with and without BatchNorm folding (``generation_fold_batchnorm``), side by side.

The suite's own engine (``generate_shard``) builds shards from real CIFAR-10 training images against one source
model with a mini config's recipe (``--recipe d_det``: targeted L2 PGD, eps 0.5, step 0.1, 10 steps; ``d_nr``: the
representation inversion of D_NR, 20 steps of 0.25), batch 250, channels_last, in ``--precision`` (default auto,
as the configs run it), once with its BatchNorm layers kept and once with them folded into the convolutions
(models/fusion.py; the default since 2026-12-08).
The two are interleaved, ``--reps`` times each, and the report gives image-steps per second, the ratio, the attack
success of both and how far their images are apart (folding rounds differently, so they are close, not equal).

    OMP_NUM_THREADS=2 python -m bench.generation_fold --source runs/mini/standard/checkpoints/last.ckpt \
        --images 1000 --reps 5 --precision auto --recipe d_det --out bench/results/DATE_generation_fold.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.common import Cifar, machine_info, median, round_robin, spread
from bench.generation_speed import recipes
from datamodules.constructed.engine import GenerationJob, GenerationSpec, generate_shard, prepared_models
from models import load_source
from models.fusion import fold_batchnorm

VARIANTS = ("BatchNorm kept", "BatchNorm folded")
RECIPES = {  # bench.generation_speed's recipes at the mini configs' steps (configs/mini/d_det.yaml, d_nonrobust.yaml)
    "d_det": lambda: recipes(steps=10)["D_rand / D_det"],
    "d_nr": lambda: recipes(steps=20)["D_R / D_NR"],
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="a suite checkpoint of the source model (e.g. mini standard)")
    p.add_argument("--images", type=int, default=1000, help="training images generated per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--precision", default="auto", help="generation_precision: auto, 32-true or bf16-mixed")
    p.add_argument("--recipe", default="d_det", choices=sorted(RECIPES))
    p.add_argument("--data_dir", default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    data = Cifar.load(args.data_dir)
    x, y = data.train_x[: args.images], data.train_y[: args.images]
    recipe = RECIPES[args.recipe]()
    model = load_source(args.source).model.eval()
    n_folded = fold_batchnorm(model)[1]
    jobs = {name: GenerationJob(x, y, torch.arange(len(y)), sources=[], recipe=recipe, progress=False,
                                spec=GenerationSpec(precision=args.precision, channels_last=True,
                                                    fold_batchnorm=name == VARIANTS[1]))
            for name in VARIANTS}
    models = {name: prepared_models([model], job.spec, job.device)[0] for name, job in jobs.items()}
    shard = range(len(y))
    outputs: dict[str, dict] = {}

    def run(name: str) -> None:
        outputs[name] = generate_shard(jobs[name], [models[name]], shard)[0]

    warm = range(min(250, len(y)))
    seconds = round_robin({n: (lambda n=n: run(n)) for n in VARIANTS}, args.reps,
                          warmups={n: (lambda n=n: generate_shard(jobs[n], [models[n]], warm)) for n in VARIANTS})
    rate = {n: args.images * recipe.steps / median(s) for n, s in seconds.items()}
    a, b = (outputs[n] for n in VARIANTS)
    command = "python -m bench.generation_fold " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "machine": machine_info(), "command": command,
        "source": str(args.source), "recipe": args.recipe, "precision": jobs[VARIANTS[0]].spec.precision,
        "batchnorms_folded": n_folded, "images": args.images, "reps": args.reps,
        "image_steps_per_second": rate, "spread": {n: spread(s) for n, s in seconds.items()},
        "speedup_folded": rate[VARIANTS[1]] / rate[VARIANTS[0]],
        "attack_success": {n: float(o["stat.attack_success"].mean()) for n, o in outputs.items()
                           if "stat.attack_success" in o},
        "max_abs_pixel_difference": float((a["x"] - b["x"]).abs().max()),
        "labels_equal": bool(torch.equal(a["y"], b["y"])),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
