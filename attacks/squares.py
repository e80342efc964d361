"""Attacks on the adversarial-squares data (SPEC 4.3, ``datamodules/squares.py``): untargeted Linf PGD without
clamping (the images live in [-1.1, 1.1], not [0, 1]), the fraction of points it flips, and the linear classifier
``sign(mean of the pixels)`` whose exact Linf radius is analytic (``|mean(x)|``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attacks.evaluate import model_device, predict
from attacks.pgd import check_attack_args, eval_mode, pgd

# ----------------------------------------------------------------------------- the linear classifier, analytic


def linear_radius(x: Tensor) -> Tensor:
    """Per example, the Linf distance from ``x`` to the decision boundary of ``sign(mean of the pixels)``.

    Moving every pixel by ``eps`` moves the mean by at most ``eps`` (and exactly ``eps`` when all move the same
    way), so the boundary ``mean = 0`` is at Linf distance ``|mean(x)|``."""
    return x.flatten(1).mean(dim=1).abs()


class PixelMeanClassifier(nn.Module):
    """The linear classifier ``sign(mean of the pixels)`` as a 2-class model: logits ``(-m, m)``, ``m = mean(x)``
    (class 1 is ``Y = +1``). Its Linf robustness radius at ``x`` is :func:`linear_radius`."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.flatten(1).mean(dim=1, keepdim=True)
        return torch.cat([-m, m], dim=1)


# --------------------------------------------------------------------------------------------- flip fractions


def attack_squares(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int = 20, step_size: float | None = None
) -> Tensor:
    """Untargeted Linf PGD away from ``y`` (e.g. the model's own predictions) within ``eps`` of ``x``: ``steps``
    sign steps of ``step_size`` (default ``2.5 * eps / steps``), no random start, stopping early once every
    example is flipped. Pixels are not clamped to any range."""
    step_size = 2.5 * eps / steps if step_size is None else step_size
    # bounds=None: squares images live in [-1.1, 1.1], not [0, 1]. Clamping to [0, 1] would move every negative
    # pixel by ~1, far beyond eps (and pgd's bounds check rejects such inputs anyway).
    return pgd(model, x, y, norm="linf", eps=eps, step_size=step_size, steps=steps, bounds=None, early_stop=True)


def flipped_by_attack(
    model: nn.Module, x: Tensor, *, eps: float, steps: int = 20, step_size: float | None = None,
    batch_size: int = 500,
) -> tuple[Tensor, Tensor]:
    """``(clean predictions, flipped mask)`` of ``model`` on ``x`` (on ``x``'s device).

    ``flipped[i]`` is True when :func:`attack_squares` finds a point within Linf ``eps`` of ``x[i]`` with another
    prediction than ``x[i]``'s. Attacking the prediction rather than the label also counts flips of wrongly
    classified points (the label-noise images).
    """
    check_attack_args("linf", eps, 2.5 * eps / steps if step_size is None else step_size, steps)
    preds, flips = [], []
    device = model_device(model, x.device)
    with eval_mode(model):
        for xb in x.split(batch_size):
            xb = xb.to(device)
            pred = predict(model, xb, batch_size=batch_size)
            x_adv = attack_squares(model, xb, pred, eps=eps, steps=steps, step_size=step_size)
            preds.append(pred.to(x.device))
            flips.append((predict(model, x_adv, batch_size=batch_size) != pred).to(x.device))
    if not preds:
        return torch.empty(0, dtype=torch.long, device=x.device), torch.empty(0, dtype=torch.bool, device=x.device)
    return torch.cat(preds), torch.cat(flips)
