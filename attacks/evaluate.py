"""Measuring attacks: robust accuracy, attack success and targeted transfer.

All functions are batched, deterministic, run the model in eval mode (restoring its mode afterwards) and move
each batch to the model's device, so a test set can stay on the CPU while the model sits on a GPU.
Rates are fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from attacks.pgd import NORMS, check_attack_args, eval_mode, pgd
from common.errors import ConfigError


def point_key(norm: str, eps: float) -> str:
    """The result key of an evaluation point: ``point_key("linf", 8/255) == "linf_0.0314"``."""
    return f"{norm}_{round(eps, 4):g}"


def model_device(model: nn.Module, default: torch.device) -> torch.device:
    """The device of the model's first parameter or buffer (``default`` for a stateless model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return default


def _batches(*tensors: Tensor, batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, ...]]:
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(tensors[0]), batch_size):
        yield tuple(t[start : start + batch_size].to(device, non_blocking=True) for t in tensors)


@torch.no_grad()
def predict(
    model: nn.Module, x: Tensor, *, batch_size: int = 256, device: torch.device | None = None
) -> Tensor:
    """Predicted labels (argmax of the logits) for ``x``, on ``x``'s device."""
    device = device or model_device(model, x.device)
    with eval_mode(model):
        preds = [
            model(xb).argmax(dim=1).to(x.device)
            for (xb,) in _batches(x, batch_size=batch_size, device=device)
        ]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=x.device)


def attack_success_rate(
    model: nn.Module, x_adv: Tensor, y: Tensor, targeted: bool, *, batch_size: int = 256
) -> float:
    """Fraction of successful adversarial examples: ``argmax == y`` if targeted (y holds the targets),
    else ``argmax != y``."""
    hits = predict(model, x_adv, batch_size=batch_size) == y.to(x_adv.device)
    return (hits if targeted else ~hits).float().mean().item()


def targeted_transfer_rate(
    x_adv: Tensor, targets: Tensor, model: nn.Module, *, batch_size: int = 256
) -> float:
    """Fraction of targeted adversarial examples that ``model`` (typically not the one attacked) classifies
    as their target."""
    return attack_success_rate(model, x_adv, targets, targeted=True, batch_size=batch_size)


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    points: Sequence[tuple[str, float]],
    *,
    steps: int = 20,
    step_size: float | None = None,
    batch_size: int = 256,
    seed: int = 0,
    **pgd_kwargs,
) -> dict[str, float]:
    """Accuracy under untargeted PGD at each ``(norm, eps)`` point, keyed by :func:`point_key`.

    A point counts as robust when it is classified correctly clean *and* after the attack (the zero
    perturbation is inside every ball), so only clean-correct examples are attacked. ``eps == 0`` gives the
    clean accuracy. ``step_size`` defaults to ``2.5 * eps / steps`` as in the robustness library's tables.
    Extra keywords go to :func:`attacks.pgd.pgd` (e.g. ``use_best``, ``random_start``, ``autocast_dtype``);
    a random start is drawn from a generator seeded with ``seed``, so results are reproducible.
    """
    if "targeted" in pgd_kwargs:
        raise ConfigError("robust_accuracy measures untargeted robustness; do not pass targeted=")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")

    def size(eps: float) -> float:
        return step_size if step_size is not None else 2.5 * eps / steps

    keyed: dict[str, tuple[str, float]] = {}  # repeated points are measured once
    for norm, eps in points:
        if keyed.setdefault(point_key(norm, eps), (norm, eps)) != (norm, eps):
            raise ConfigError(f"points {keyed[point_key(norm, eps)]} and {(norm, eps)} share the key "
                             f"{point_key(norm, eps)!r}; give epsilons that differ in the first 4 decimals")
        if math.isinf(eps):
            raise ConfigError("robust accuracy at an infinite eps is meaningless; use a finite eps")
        if eps != 0:
            check_attack_args(norm, eps, size(eps), steps)
        elif norm not in NORMS:
            raise ConfigError(f"unknown norm {norm!r}; use one of {NORMS}")
    if pgd_kwargs.get("random_start") and pgd_kwargs.get("generator") is None:
        pgd_kwargs["generator"] = torch.Generator().manual_seed(seed)

    device = model_device(model, x.device)
    robust = dict.fromkeys(keyed, 0)
    with eval_mode(model):
        for xb, yb in _batches(x, y, batch_size=batch_size, device=device):
            clean_ok = predict(model, xb, batch_size=batch_size) == yb
            attacked = clean_ok.nonzero().squeeze(1)
            for norm, eps in keyed.values():
                ok = clean_ok.clone()
                if eps > 0 and attacked.numel():
                    x_adv = pgd(
                        model,
                        xb[attacked],
                        yb[attacked],
                        norm=norm,
                        eps=eps,
                        step_size=size(eps),
                        steps=steps,
                        **pgd_kwargs,
                    )
                    ok[attacked] = predict(model, x_adv, batch_size=batch_size) == yb[attacked]
                robust[point_key(norm, eps)] += int(ok.sum())
    return {key: count / max(len(x), 1) for key, count in robust.items()}
