"""Throughput of one step of Nakkiran's non-transferable attack: the loss ``CE(f(x), t) + mean_i CE(f_i(x), y)``
and its gradient with respect to the input, with the k ensemble members evaluated by one ``vmap`` pass
(``attacks.ensemble.BatchedEnsemble``) or by a Python loop (``LoopEnsemble``).

    OMP_NUM_THREADS=1 python bench/ensemble_speed.py              # k = 3 and 10 fast CNNs, batch 250
    OMP_NUM_THREADS=1 python bench/ensemble_speed.py --reps 3 --channels-last --whiten

The members are randomly initialised fast CNNs with non-trivial BatchNorm statistics (a few train-mode forwards
on random images, or on the images given): the cost of a step depends on the architecture, not on the weights or
the image content. ``--whiten`` gives them the patch-whitening stem of the mini configs (fitted on those images).
Throughput is image-steps per second (batch / median seconds per step); runs are interleaved (``round_robin``).
``bench/run.py --sections ensemble`` runs the same measurement on real CIFAR-10 images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/ensemble_speed.py` puts bench/ first on sys.path; the repository root is what the imports need.
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from attacks.ensemble import BatchedEnsemble, LoopEnsemble, nakkiran_loss  # noqa: E402
from bench.common import CL, median, round_robin, spread  # noqa: E402
from models import build_model  # noqa: E402

BATCHED, LOOP = "batched (vmap)", "loop"


def members_with_statistics(k: int, arch: str = "fast_cnn", seed: int = 0, whiten: bool = False,
                            images: torch.Tensor | None = None) -> list[nn.Module]:
    """``k + 1`` models (the target, then k members), each with its own seed and BatchNorm running statistics
    from a train-mode forward of ``images`` (float in [0, 1]; default 32 random images), which also fit the
    patch-whitening stem when ``whiten``."""
    models = []
    for i in range(k + 1):
        torch.manual_seed(seed + i)
        model = build_model(arch, **({"whiten": True} if whiten else {}))
        stats_images = torch.rand(32, 3, 32, 32) if images is None else images  # drawn after the weights, as before
        with torch.no_grad():
            model.fit_whitening(stats_images)  # a no-op without the stem; train mode refuses an unfitted one
            model.train()
            model(stats_images)
        models.append(model.eval().requires_grad_(False))
    return models


def step_runner(target: nn.Module, ensemble: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                channels_last: bool):
    """One attack step's work: the non-transferable loss and its input gradient, returned as (loss, grad)."""
    loss_fn = nakkiran_loss(target, ensemble, y)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = x.detach().requires_grad_(True)
        x_in = x_adv.contiguous(memory_format=CL) if channels_last else x_adv
        loss = loss_fn(target, x_in, t)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), grad

    return run


def ensemble_speed(ks: tuple[int, ...] = (3, 10), batch: int = 250, reps: int = 5, channels_last: bool = False,
                   seed: int = 0, *, inputs: tuple[torch.Tensor, torch.Tensor] | None = None, whiten: bool = False,
                   stats_images: torch.Tensor | None = None) -> dict:
    """``{k: {method: {"seconds", "image_steps_per_s", "spread"}, "max_grad_difference", "max_loss_difference"}}``.

    ``inputs``: the attacked batch (images in [0, 1], true labels; default ``batch`` random ones), the same for
    both methods; targets t = y + 1. ``whiten`` / ``stats_images``: see ``members_with_statistics``."""
    results: dict = {}
    if inputs is None:
        gen = torch.Generator().manual_seed(seed)
        inputs = torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(10, (batch,), generator=gen)
    x, y = inputs
    batch = len(y)
    t = (y + 1) % 10
    for k in ks:
        models = members_with_statistics(k, seed=seed, whiten=whiten, images=stats_images)
        if channels_last:
            models = [m.to(memory_format=CL) for m in models]
        target, *members = models
        runners = {BATCHED: step_runner(target, BatchedEnsemble(members), x, y, t, channels_last),
                   LOOP: step_runner(target, LoopEnsemble(members), x, y, t, channels_last)}
        outputs = {name: run() for name, run in runners.items()}  # also the warm-up
        times = round_robin(runners, reps)
        results[k] = {name: {"seconds": times[name], "image_steps_per_s": batch / median(times[name]),
                             "spread": spread(times[name])} for name in runners}
        (loss_b, grad_b), (loss_l, grad_l) = outputs[BATCHED], outputs[LOOP]
        results[k]["max_loss_difference"] = float((loss_b - loss_l).abs().max())
        results[k]["max_grad_difference"] = float((grad_b - grad_l).abs().max())
        print(f"[ensemble] k={k}: " + ", ".join(f"{n} {results[k][n]['image_steps_per_s']:.1f} image-steps/s"
                                                 for n in runners), flush=True)
    return results


def table(results: dict) -> list[str]:
    """The markdown table rows of ``ensemble_speed`` results (also used by bench/report.py)."""
    lines = [f"| k | {BATCHED} image-steps/s (spread) | {LOOP} image-steps/s (spread) | batched / loop | "
             "max abs. loss difference | max abs. gradient difference |", "|---|---|---|---|---|---|"]
    for k, r in results.items():
        b, loop = r[BATCHED], r[LOOP]
        lines.append(f"| {k} | {b['image_steps_per_s']:.1f} ({b['spread']:.0%}) | {loop['image_steps_per_s']:.1f} "
                     f"({loop['spread']:.0%}) | {b['image_steps_per_s'] / loop['image_steps_per_s']:.2f}x | "
                     f"{r['max_loss_difference']:.1e} | {r['max_grad_difference']:.1e} |")
    return lines


def markdown(results: dict, batch: int, channels_last: bool) -> str:
    layout = "channels_last" if channels_last else "contiguous"
    lines = [f"Non-transferable attack step (target + k fast-CNN members, loss + input gradient), batch {batch}, "
             f"fp32 {layout}, {torch.get_num_threads()} thread(s); median image-steps/s (spread):", "",
             *table(results)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="3,10", help="ensemble sizes, comma-separated (default 3,10)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--channels-last", action="store_true", help="feed the models channels_last inputs")
    p.add_argument("--whiten", action="store_true", help="fast CNNs with the patch-whitening stem (mini configs)")
    args = p.parse_args(argv)
    ks = tuple(int(k) for k in args.ks.split(",") if k)
    results = ensemble_speed(ks, args.batch, args.reps, args.channels_last, whiten=args.whiten)
    print(markdown(results, args.batch, args.channels_last))
    return results


if __name__ == "__main__":
    main()
