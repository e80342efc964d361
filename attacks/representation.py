"""A network's representations layer by layer, for the authors' rebuttal and Nakano's response (SPEC 5.5):

- ``layer_robustness``: R(f) = E_x[max over x' in the L2 ball B(x) of ||f(x') - f(x)||_2] / E_{x1,x2}[||f(x1) -
  f(x2)||_2], the worst-case change of a layer's output inside the ball relative to how far apart two random
  images lie in it (the max found by PGD ascending the distance);
- ``invert``: representation inversion, descending ||g(z) - g(x)|| / ||g(x)|| from a start image z0 (D_R's
  procedure, SPEC 2; from noise for Nakano's question: does a robust model's representation hold the image?).

"A layer" of a suite network (models/networks.py: normalisation, an ``nn.Sequential`` body, a linear head) is
the output of each top-level activation, residual block or whitening layer of its body, in order; the last one
is the penultimate representation ``features``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from attacks.pgd import pgd
from common.errors import ConfigError

# The top-level modules of a body whose outputs count as layers: activations and blocks that end in one
# (a residual block ends in its ReLU, the whitening layer in its GELU), by class name so that attacks/ needs no
# import of models/.
LAYER_ENDS = (nn.ReLU, nn.GELU)
LAYER_END_NAMES = ("BasicBlock", "Bottleneck", "PatchWhitening")


def layer_positions(model: nn.Module) -> list[int]:
    """The positions in ``model.body`` after which a layer's output is read (the last: the whole body)."""
    body = getattr(model, "body", None)
    if not isinstance(body, nn.Sequential) or not hasattr(model, "normalize"):
        raise ConfigError(f"layer representations need a suite classifier (normalize + nn.Sequential body), got "
                          f"{type(model).__name__}; build it with models.build_model")
    ends = [i for i, m in enumerate(body) if isinstance(m, LAYER_ENDS) or type(m).__name__ in LAYER_END_NAMES]
    return [i for i in ends if i != len(body) - 1] + [len(body) - 1]


def layer_names(model: nn.Module, count: int) -> list[str]:
    """Names of the first ``count`` layers and of the representation: ``layer1 (GELU)``, ..., ``representation``."""
    positions = layer_positions(model)
    body = model.body
    first = positions[:-1][:count]
    return [f"layer{k} ({type(body[i]).__name__})" for k, i in enumerate(first, 1)] + ["representation"]


def layer_outputs(model: nn.Module, x: Tensor, count: int) -> list[Tensor]:
    """The flattened outputs [B, D] of the first ``count`` layers and of the representation, one forward."""
    positions = layer_positions(model)
    wanted = set(positions[:-1][:count]) | {positions[-1]}
    outputs, h = [], model.normalize(x)
    for i, module in enumerate(model.body):
        h = module(h)
        if i in wanted:
            outputs.append(h.flatten(1).float())
    return outputs


def _layer_output(model: nn.Module, x: Tensor, position: int) -> Tensor:
    """The output after ``model.body[position]``, computing no further."""
    h = model.normalize(x)
    for module in model.body[:position + 1]:
        h = module(h)
    return h.flatten(1).float()


def layer_robustness(model: nn.Module, x: Tensor, *, count: int, eps: float, steps: int, step_size: float,
                     generator: torch.Generator, batch_size: int = 250) -> dict[str, dict[str, float]]:
    """Per layer (:func:`layer_names`): R(f) at L2 radius ``eps`` on images ``x`` (in [0, 1]), its numerator
    (mean worst-case distance; PGD of ``steps`` steps of ``step_size`` from a random point of the ball) and its
    denominator (mean distance between each image and a random other one of ``x``)."""
    if len(x) < 2:
        raise ConfigError("layer robustness needs at least two images (its denominator pairs them)")
    positions = layer_positions(model)
    positions = positions[:-1][:count] + positions[-1:]
    names = layer_names(model, count)
    order = torch.randperm(len(x), generator=generator)
    partner = torch.empty_like(order)
    partner[order] = order.roll(1)  # a random pairing without fixed points
    sums = {name: {"worst_case": 0.0, "between_images": 0.0} for name in names}
    for start in range(0, len(x), batch_size):
        part, other = x[start:start + batch_size], x[partner[start:start + batch_size]]
        for name, position in zip(names, positions, strict=True):
            with torch.no_grad():
                clean = _layer_output(model, part, position)
                between = (_layer_output(model, other, position) - clean).norm(dim=1)

            def distance(m: nn.Module, z: Tensor, target: Tensor, position: int = position) -> Tensor:
                return (_layer_output(m, z, position) - target).norm(dim=1)

            # A random start: at x' = x the distance has no gradient to follow.
            moved = pgd(model, part, clean, norm="l2", eps=eps, step_size=step_size, steps=steps,
                        random_start=True, loss_fn=distance, generator=generator)
            with torch.no_grad():
                sums[name]["worst_case"] += float(distance(model, moved, clean).sum())
                sums[name]["between_images"] += float(between.sum())
    result = {}
    for name, s in sums.items():
        worst, between = s["worst_case"] / len(x), s["between_images"] / len(x)
        result[name] = {"R": worst / between if between > 0 else math.nan, "worst_case": worst,
                        "between_images": between}
    return result


def invert(model: nn.Module, goal: Tensor, start: Tensor, *, steps: int, step_size: float, use_best: bool = True,
           autocast_dtype: torch.dtype | None = None, channels_last: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Images z in [0, 1] whose representation ``model.features(z)`` approaches that of ``goal``: ``steps``
    L2-normalised steps of ``step_size`` from ``start`` descending ||g(z) - g(goal)|| / ||g(goal)|| (dividing by
    ||g(goal)||, as the authors' code does, leaves normalised steps unchanged and makes the distance comparable
    between models), the best iterate kept unless ``use_best`` is False. Returns z and, per example, the relative
    ``representation_distance`` reached and the ``start_distance`` it began from."""
    def forward_numerics():
        return (torch.autocast(device_type=goal.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    with torch.no_grad(), forward_numerics():
        target = model.features(goal).float()
    scale = target.norm(dim=1).clamp_min(1e-12)

    def relative_distance(m: nn.Module, z: Tensor, target: Tensor) -> Tensor:
        return (m.features(z).float() - target).norm(dim=1) / scale

    z = pgd(model, start, target, norm="l2", eps=math.inf, step_size=step_size, steps=steps, targeted=True,
            random_start=False, use_best=use_best, loss_fn=relative_distance, autocast_dtype=autocast_dtype,
            channels_last=channels_last)
    with torch.no_grad(), forward_numerics():
        return z, {"representation_distance": relative_distance(model, z, target),
                   "start_distance": relative_distance(model, start, target)}


def pixel_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Per pair of images, the Pearson correlation of their pixels: 1 for the same picture up to brightness and
    contrast, about 0 for unrelated ones."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
