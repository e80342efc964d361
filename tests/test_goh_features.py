"""Goh's linear features (SPEC 5.2, models/linear_features.py): usefulness, robustness, the two constructions.
Synthetic Gaussian data for the algebra; the real truck-vs-frog measure runs in the tiny preset."""

from __future__ import annotations

import pytest
import torch

from models.linear_features import (
    containment_feature,
    ensemble_feature,
    pixel_basis,
    robust_usefulness,
    robustness,
    usefulness,
)
from pipeline import claims

D = 12


def two_class_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels +-1 and independent coordinates ``x_i = s_i (g_i + m_i y)``: coordinate 0 wide and useful (robust),
    1-8 narrow and somewhat useful (not robust at eps 0.15), the rest narrow noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    scale = torch.tensor([1.0] + [0.1] * 8 + [0.01] * (D - 9), dtype=torch.float64)
    signal = torch.tensor([1.0] + [0.3] * 8 + [0.0] * (D - 9), dtype=torch.float64)
    x = scale * (torch.randn(n, D, generator=gen, dtype=torch.float64) + signal * y[:, None])
    return 0.5 + 0.1 * x, y  # "pixels" near 0.5


def test_basis_vectors_robustness_is_their_standard_deviation_and_the_bound_is_attained():
    x, y = two_class_data(20_000, 0)
    basis = pixel_basis(x)
    centred = basis.centre(x)
    assert torch.allclose(robustness(basis.vectors, basis), basis.robustness, rtol=1e-9)
    assert torch.allclose(basis.robustness, centred.matmul(basis.vectors).std(0, correction=0), rtol=1e-6)
    # The L2 adversary's best move against f = a^T x / ||a||_Sigma is -eps y a / ||a||_2: it lowers E[y f] by
    # exactly eps ||a||_2 / ||a||_Sigma, which is what robust_usefulness subtracts.
    a = torch.randn(D, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps = 0.05
    attacked = centred - eps * y[:, None] * (a[:, 0] / a.norm())
    assert usefulness(a, attacked, y, basis).item() == pytest.approx(
        robust_usefulness(a, centred, y, basis, eps).item(), rel=1e-9)


def test_the_ensemble_is_useful_and_not_robust_and_the_containment_holds_a_robust_direction():
    x, y = two_class_data(20_000, 0)
    held_x, held_y = two_class_data(5_000, 1)
    basis = pixel_basis(x)
    centred, held = basis.centre(x), basis.centre(held_x)
    eps = 0.015  # in pixels (the data is scaled by 0.1): 0.15 of the coordinates' units
    useful = usefulness(basis.vectors, centred, y, basis)
    robust = useful - eps / basis.robustness
    assert (robust > 0).sum() >= 1 and (robust <= 0).sum() >= 3  # both kinds of basis vector exist
    ensemble = ensemble_feature(basis, useful, eps, rank=9)[:, None]  # the 9 widest: coordinate 0 and 1-8
    assert usefulness(ensemble, held, held_y, basis).item() > 0.1
    assert robust_usefulness(ensemble, held, held_y, basis, eps).item() < 0
    best = int(torch.argmax(torch.where(robust > 0, useful, -torch.inf)))
    part = (torch.sign(useful[best]) * basis.vectors[:, best])[:, None]
    assert robust_usefulness(part, held, held_y, basis, eps).item() > 0  # robust on its own
    contained = containment_feature(ensemble[:, 0], part[:, 0], basis, alpha=0.25)[:, None]
    assert usefulness(contained, held, held_y, basis).item() > usefulness(ensemble, held, held_y, basis).item()
    assert robust_usefulness(contained, held, held_y, basis, eps).item() < 0  # and still not robust


def test_the_report_reads_the_constructions_and_states_each_claim():
    feature = {"usefulness": 0.43, "robust_usefulness": -0.5, "robustness": 1.06}
    measured = {"basis": {"robustness": [7.3], "usefulness": [0.43]}, "eps": 1.0, "classes": ["truck", "frog"],
                "ensemble": feature, "containment": {**feature, "robust_usefulness": 0.1,
                                                     "robust_part": {**feature, "robust_usefulness": 0.29}}}
    rows = {r["id"]: r for r in claims.evaluate({"goh_features": {"kind": "measure", "results": measured}})}
    assert rows["goh_features.ensemble_usefulness"]["holds"] is True
    assert rows["goh_features.ensemble_robust_usefulness"]["holds"] is True
    assert rows["goh_features.containment_robust_usefulness"]["holds"] is False  # 0.1 is robust: the claim fails
    assert rows["goh_features.robust_part"]["suite"] == 0.29 and rows["goh_features.robust_part"]["holds"] is True
    assert rows["goh_features.ensemble_usefulness"]["percent"] is False
