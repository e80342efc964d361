"""Goh's robust feature leakage (SPEC 5.1): the closed-form worst case of a linear classifier, certified training
(lightning_modules/certified.py) on real CIFAR-10, and the linear fit on fixed features (models/linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attacks import pgd
from common.errors import ConfigError
from lightning_modules import CertifiedLinearModule, ClassifierModule
from models import build_model
from models.linear import certified, fit_linear, label_alignment, margin_direction, pixel_weight, worst_case_logits

EPS = 0.25
MEAN, STD = (0.49, 0.48, 0.45), (0.2, 0.25, 0.3)


def test_the_closed_form_worst_case_is_reached_by_the_perturbation_along_the_weight_difference():
    torch.manual_seed(0)
    model = build_model("linear", mean=MEAN, std=STD).eval()
    x, y = torch.rand(6, 3, 32, 32), torch.arange(6) % 10
    weight = pixel_weight(model)
    with torch.no_grad():
        logits = model(x)
        worst = worst_case_logits(logits, y, weight, EPS)
        for k in range(10):
            direction = (weight[y] - weight[k]).view(-1, 3, 32, 32)
            norms = direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            moved = model(x - EPS * direction / norms)  # the L2 step that lowers margin y - k the most
            attained = moved.gather(1, y[:, None])[:, 0] - moved[:, k]
            bound = logits.gather(1, y[:, None])[:, 0] - worst[:, k]
            assert torch.allclose(attained, bound, atol=1e-4), k


def test_the_label_alignment_is_one_along_the_margin_direction_and_near_zero_for_a_random_perturbation():
    torch.manual_seed(0)
    model = build_model("linear", mean=MEAN, std=STD).eval()
    weight, labels = pixel_weight(model).detach(), torch.arange(20) % 10
    along = 0.3 * margin_direction(weight, labels).view(-1, 3, 32, 32)
    random = torch.randn(20, 3, 32, 32)
    x = torch.rand(20, 3, 32, 32)
    with torch.no_grad():  # the direction raises the label's logit above the others' mean by exactly direction . d
        shift = model(x + along) - model(x)
        others = (shift.sum(1) - shift[torch.arange(20), labels]) / 9
        moved = shift[torch.arange(20), labels] - others
    assert torch.allclose(moved, (along.flatten(1) * margin_direction(weight, labels)).sum(1), atol=1e-4)
    assert torch.allclose(label_alignment(along, labels, weight), torch.ones(20), atol=1e-5)
    assert label_alignment(random, labels, weight).abs().max() < 0.1  # 1/sqrt(3072) = 0.018 typical
    assert label_alignment(-along, labels, weight).mean() < -0.99


def train(module: ClassifierModule, x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> ClassifierModule:
    """A few Adam steps on random batches of 256 (the module's own training logits and loss)."""
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(y), (256,), generator=generator)
        loss = F.cross_entropy(module.training_logits(x[batch], y[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return module.eval()


def test_certified_training_certifies_real_test_images_and_pgd_cannot_break_them(cifar):
    x_train, y_train, x_test, y_test = cifar
    x, y = x_train[:10000].float() / 255, y_train[:10000].long()
    xt, yt = x_test[:1000].float() / 255, y_test[:1000].long()
    torch.manual_seed(0)
    robust = train(CertifiedLinearModule(arch="linear", arch_kwargs={}, eps=EPS), x, y)
    torch.manual_seed(0)
    plain = train(ClassifierModule(arch="linear", arch_kwargs={}), x, y)
    with torch.no_grad():
        held = certified(robust(xt), yt, pixel_weight(robust.model), EPS)
        plain_held = certified(plain(xt), yt, pixel_weight(plain.model), EPS).float().mean()
    assert held.float().mean() >= 0.2 and held.float().mean() > plain_held + 0.05, (held.float().mean(), plain_held)
    adversarial = pgd(robust.model, xt, yt, norm="l2", eps=EPS, step_size=EPS / 4, steps=20)
    with torch.no_grad():
        survived = robust(adversarial).argmax(1) == yt
    assert survived[held].all()  # a certificate PGD breaks would be a wrong certificate


def test_certified_training_refuses_a_non_linear_network_or_a_bad_radius():
    with pytest.raises(ConfigError, match="arch: linear"):
        CertifiedLinearModule(arch="fast_cnn")
    with pytest.raises(ConfigError, match="eps must be a finite number >= 0"):
        CertifiedLinearModule(arch="linear", arch_kwargs={}, eps=float("nan"))


def test_a_linear_fit_on_informative_features_beats_chance_and_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    signal = 3 * F.one_hot(labels, 10).float() + torch.randn(2000, 10, generator=generator)  # argmax: ~90%
    features = signal * 1000 + 5000  # the scale of raw logits of 3,072 pixels, far from zero
    a, b = fit_linear(features[:1000], labels[:1000]), fit_linear(features[:1000], labels[:1000])
    with torch.no_grad():
        accuracy = (a(features[1000:]).argmax(1) == labels[1000:]).float().mean()
        assert torch.equal(a(features), b(features))
    assert accuracy > 0.7  # chance: 0.1; standardised, the scale and offset do not matter
