"""Gilmer & Hendrycks (SPEC 5.4): the Fourier basis, the error map, Gaussian noise augmentation, the report's claims.
The measure on real models runs in the tiny preset."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import Synthetic, write_checkpoint
from torch import nn

from attacks.fourier import band_error, basis_image, fourier_error_map, frequencies
from common.errors import ConfigError
from datamodules import RelabelByAttack
from pipeline import claims


def test_basis_images_are_unit_real_waves_of_one_frequency_and_its_mirror():
    kept = frequencies(32)
    assert len(kept) == 514  # 1024 frequencies: 510 mirrored pairs and 4 that are their own mirror
    mirror = {((-u + 16) % 32 - 16, (-v + 16) % 32 - 16) for u, v in kept}
    assert mirror | set(kept) == {(u, v) for u in range(-16, 16) for v in range(-16, 16)}
    image = basis_image(3, -5)
    assert image.norm().item() == pytest.approx(1.0) and torch.allclose(image, basis_image(-3, 5))
    spectrum = torch.fft.fft2(image).abs()
    assert set(map(tuple, (spectrum > 1e-9).nonzero().tolist())) == {(3, 27), (29, 5)}
    assert torch.allclose(basis_image(0, 0), torch.full((32, 32), 1 / 32, dtype=torch.float64))


class FrequencyDetector(nn.Module):
    """Class 1 when an image (minus 0.5) has energy at one frequency, class 0 otherwise."""

    def __init__(self, u: int, v: int) -> None:
        super().__init__()
        self.wave = basis_image(u, v).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = ((x - 0.5) * self.wave).sum((2, 3)).abs().sum(1)
        return torch.stack([torch.zeros_like(energy), energy - 1.0], dim=1)


def test_the_error_map_marks_exactly_the_frequency_a_model_is_sensitive_to():
    x, y = torch.full((6, 3, 32, 32), 0.5), torch.zeros(6, dtype=torch.long)
    errors = fourier_error_map(FrequencyDetector(2, -7), x, y, norm=4.0, batch_size=4)
    wrong = {tuple(i) for i in (errors > 0).nonzero().tolist()}
    assert wrong == {(2 + 16, -7 + 16), (-2 + 16, 7 + 16)} and errors.max().item() == 1.0  # and its mirror
    assert band_error(errors, 0, 4) == 0.0 and band_error(errors, 7, 7) == pytest.approx(2 / (15 * 15 - 13 * 13))


def test_gaussian_noise_augments_training_batches_only(tmp_path):
    ckpt = write_checkpoint(tmp_path / "s.ckpt")
    dm = Synthetic([str(ckpt)], RelabelByAttack("shift", steps=1), cache_dir=str(tmp_path), augment=False,
                   noise_std=0.1)
    x = torch.full((64, 3, 16, 16), 0.5)
    dm.trainer = SimpleNamespace(training=True)
    noisy, _ = dm.on_after_batch_transfer((x, torch.zeros(64)), 0)
    assert noisy.std().item() == pytest.approx(0.1, rel=0.05) and noisy.min() >= 0 and noisy.max() <= 1
    dm.trainer = SimpleNamespace(training=False)
    assert torch.equal(dm.on_after_batch_transfer((x, torch.zeros(64)), 0)[0], x)  # evaluation: clean
    with pytest.raises(ConfigError, match="noise_std"):
        Synthetic([str(ckpt)], RelabelByAttack(), cache_dir=str(tmp_path), noise_std=-0.1)


def test_the_report_states_gilmer_and_hendrycks_claims():
    def model(fog: float, low: float, high: float) -> dict:
        return {"fog_acc": fog, "contrast_acc": 0.5, "low_band_acc": low, "high_band_acc": high}

    measured = {"models": {"standard": model(0.70, 0.80, 0.30), "adversarial_l2": model(0.55, 0.60, 0.70),
                           "gaussian_noise": model(0.65, 0.75, 0.25)}}
    rows = {r["id"]: r for r in claims.evaluate({"frequency": {"kind": "measure", "results": measured}})}
    assert rows["frequency.adversarial_l2.fog"]["holds"] is True and rows["frequency.standard.fog"]["claim"] is None
    assert rows["frequency.adversarial_l2.low_band"]["holds"] is True
    assert rows["frequency.adversarial_l2.high_band"]["holds"] is True
    assert rows["frequency.gaussian_noise.high_band"]["holds"] is False  # 25% is not above 30%
    assert rows["frequency.adversarial_l2.fog"]["paper"].startswith("55.3%")
