"""Linear classifiers: the closed-form worst case of an L2-bounded perturbation, and a small trainer for a linear
classifier on fixed features (Goh's robust feature leakage, SPEC 5.1).

For logits ``z = W x + b`` of an image ``x`` in pixel units, a perturbation ``d`` with ``||d||_2 <= eps`` moves the
margin ``z_y - z_k`` by ``(w_y - w_k)^T d``, at worst ``-eps * ||w_y - w_k||_2``: no attack is needed to know the
worst case, per pair of classes, exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.networks import Classifier


def pixel_weight(model: Classifier) -> torch.Tensor:
    """``W`` of a ``linear`` Classifier in pixel units, ``[classes, C*H*W]``: its head's weight divided by the
    normalisation's std of each input channel (the mean only shifts the bias)."""
    if not isinstance(model.body, nn.Flatten):
        raise ValueError("pixel_weight needs a Classifier of architecture 'linear'")
    std = model.normalize.std.flatten()
    per_feature = std.repeat_interleave(model.head.in_features // std.numel())
    return model.head.weight / per_feature


def pair_distances(weight: torch.Tensor) -> torch.Tensor:
    """``||w_i - w_j||_2`` for every pair of classes, ``[classes, classes]`` (zero on the diagonal, with a zero
    gradient there: the norm's own gradient at 0 is 0/0)."""
    squared = (weight[:, None] - weight[None]).pow(2).sum(-1)
    diagonal = torch.eye(len(weight), dtype=torch.bool, device=weight.device)
    return torch.where(diagonal, 0.0, squared.clamp_min(1e-12).sqrt())


def worst_case_logits(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Logits with every wrong class ``k`` raised by ``eps * ||w_y - w_k||_2``: each margin ``z_y - z_k`` at its
    worst over the L2 ball of radius ``eps`` (cross-entropy of these bounds the worst-case cross-entropy)."""
    return logits + eps * pair_distances(weight)[y]


def certified(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Whether each prediction is correct for every perturbation of L2 norm <= ``eps`` (bool ``[N]``)."""
    worst = worst_case_logits(logits, y, weight, eps)
    worst[torch.arange(len(y)), y] = -torch.inf
    return logits.gather(1, y[:, None])[:, 0] > worst.max(dim=1).values


def margin_direction(weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per label ``t``, the pixel direction ``w_t - mean_{k != t} w_k`` ``[N, D]``: a perturbation ``delta`` raises
    ``t``'s logit above the others' mean by exactly ``direction . delta``."""
    others = (weight.sum(0, keepdim=True) - weight) / (len(weight) - 1)
    return (weight - others)[labels]


def label_alignment(delta: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cosine ``[N]`` between each perturbation ``delta`` ``[N, ...]`` and its label's ``margin_direction``: 1 when
    the perturbation is all robust feature of its label, about ``+-1/sqrt(D)`` when it is blind to them."""
    direction = margin_direction(weight, labels)
    return F.cosine_similarity(delta.flatten(1).to(direction), direction, dim=1)


def fit_linear(features: torch.Tensor, labels: torch.Tensor, classes: int = 10, *, steps: int = 500,
               lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> nn.Module:
    """A linear classifier on fixed ``features`` ``[N, D]``: the features standardised with their own mean and
    std (kept in the returned module), then full-batch Adam on cross-entropy for ``steps`` steps. Deterministic
    for a given ``seed``; the defaults are the suite's choice."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-8)
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(features.shape[1], classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.01)
        linear.bias.zero_()
    model = nn.Sequential(Standardize(mean, std), linear)
    optimiser = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(model(features), labels).backward()
        optimiser.step()
    return model.eval().requires_grad_(False)


class Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
