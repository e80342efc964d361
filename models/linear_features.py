"""Goh's linear features (SPEC 5.2): how useful and how robust a direction of pixel space is for a two-class task.

On mean-zero images ``x`` (pixels in [0, 1], the training mean subtracted) with labels ``y`` in {-1, +1}, a
direction ``a`` gives the feature ``f(x) = a^T x / ||a||_Sigma``, ``Sigma = E[x x^T]``, ``||a||_Sigma =
sqrt(a^T Sigma a)`` (unit variance). Its *usefulness* is ``E[y f(x)]``; against an L2 adversary of radius eps its
*robust usefulness* is ``E[y f(x)] - eps ||a||_2 / ||a||_Sigma`` (the adversary moves f by at most that much), so
the direction's *robustness* is ``||a||_Sigma / ||a||_2``: for a singular vector of the centred training images
it is the vector's singular value (the standard deviation of the images along it). A feature is admissible at eps
when its robust usefulness is positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PixelBasis:
    """The singular vectors of centred training images, most robust first."""

    mean: torch.Tensor  # [D] the training mean
    covariance: torch.Tensor  # [D, D] Sigma of the centred training images
    vectors: torch.Tensor  # [D, D] column i: the i-th singular vector (unit L2 norm)
    robustness: torch.Tensor  # [D] singular values / sqrt(n): the standard deviation along each vector

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() - self.mean


def pixel_basis(x: torch.Tensor) -> PixelBasis:
    """The basis of ``x`` (images ``[N, ...]`` in [0, 1]), in float64: the eigenvectors of the covariance."""
    flat = x.flatten(1).double()
    mean = flat.mean(0)
    centred = flat - mean
    covariance = centred.T @ centred / len(flat)
    variances, vectors = torch.linalg.eigh(covariance)  # ascending
    return PixelBasis(mean, covariance, vectors.flip(1), variances.flip(0).clamp_min(0).sqrt())


def sigma_norm(a: torch.Tensor, basis: PixelBasis) -> torch.Tensor:
    """``||a||_Sigma`` of each column of ``a`` ``[D, K]``."""
    return (a * (basis.covariance @ a)).sum(0).sqrt()


def usefulness(a: torch.Tensor, x_centred: torch.Tensor, y: torch.Tensor, basis: PixelBasis) -> torch.Tensor:
    """``E[y f(x)]`` of each direction (columns of ``a``), on centred images and labels in {-1, +1}."""
    return (y.double()[:, None] * (x_centred @ a)).mean(0) / sigma_norm(a, basis)


def robustness(a: torch.Tensor, basis: PixelBasis) -> torch.Tensor:
    """``||a||_Sigma / ||a||_2`` of each direction: the L2 radius at which a usefulness of 1 is used up."""
    return sigma_norm(a, basis) / a.norm(dim=0)


def robust_usefulness(a: torch.Tensor, x_centred: torch.Tensor, y: torch.Tensor, basis: PixelBasis,
                      eps: float) -> torch.Tensor:
    """``E[y f(x)] - eps ||a||_2 / ||a||_Sigma``: the usefulness left against an L2 adversary of radius ``eps``."""
    return usefulness(a, x_centred, y, basis) - eps / robustness(a, basis)


def ensemble_members(basis: PixelBasis, useful: torch.Tensor, eps: float, rank: int) -> torch.Tensor:
    """Which basis vectors the ensemble sums (bool ``[D]``): those among the ``rank`` most robust that are *not*
    robust at ``eps`` (``useful - eps / robustness <= 0``, ``useful``: their usefulness on the training images)."""
    return (torch.arange(len(useful)) < rank) & (useful - eps / basis.robustness <= 0)


def ensemble_feature(basis: PixelBasis, useful: torch.Tensor, eps: float, rank: int) -> torch.Tensor:
    """Goh's construction 1: the sum of the :func:`ensemble_members`, each signed by its usefulness. A useful
    feature made only of non-robust directions."""
    keep = ensemble_members(basis, useful, eps, rank)
    return (torch.sign(useful) * keep.double() * basis.vectors).sum(1)


def containment_feature(non_robust: torch.Tensor, robust: torch.Tensor, basis: PixelBasis,
                        alpha: float) -> torch.Tensor:
    """Goh's construction 2: ``(1 - alpha) a_nonrobust + alpha a_robust``, both scaled to unit ``||.||_Sigma``
    first, so ``alpha`` is the share of the feature's variance budget given to the robust direction."""
    def unit(a: torch.Tensor) -> torch.Tensor:
        return a / sigma_norm(a[:, None], basis)[0]

    return (1 - alpha) * unit(non_robust) + alpha * unit(robust)
