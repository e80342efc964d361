"""The rebuttal's layer robustness R(f) and representation inversion from noise (SPEC 5.5): the layers a network
exposes, R(f) where the worst case is known in closed form, inversion where the answer is the goal image, and the
report's rows. The measures on real models run in the tiny preset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.representation import invert, layer_names, layer_outputs, layer_robustness, pixel_correlation
from common.errors import ConfigError
from models import build_model
from models.networks import Classifier
from pipeline import claims


@pytest.mark.parametrize(("arch", "kwargs", "layers"), [
    ("fast_cnn", {"whiten": True}, ["layer1 (PatchWhitening)", "layer2 (GELU)", "layer3 (GELU)", "layer4 (GELU)"]),
    ("resnet18", {}, ["layer1 (ReLU)", "layer2 (BasicBlock)", "layer3 (BasicBlock)", "layer4 (BasicBlock)"]),
    ("vgg16", {}, ["layer1 (ReLU)", "layer2 (ReLU)", "layer3 (ReLU)", "layer4 (ReLU)"]),
])
def test_layers_are_the_bodys_activations_and_blocks_then_the_representation(arch, kwargs, layers):
    model = build_model(arch, **kwargs).eval()
    assert layer_names(model, 4) == [*layers, "representation"]
    x = torch.rand(2, 3, 32, 32)
    outputs = layer_outputs(model, x, 4)
    assert len(outputs) == 5 and torch.allclose(outputs[-1], model.features(x))


def test_a_model_without_a_sequential_body_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="build_model"):
        layer_names(nn.Linear(3, 2), 4)


def identity_classifier() -> Classifier:
    """Normalisation by (0, 1) and a Flatten body: the representation is the image itself."""
    return Classifier(nn.Sequential(nn.Flatten()), 3 * 8 * 8, 10, mean=(0, 0, 0), std=(1, 1, 1)).eval()


def test_r_of_the_identity_is_the_radius_over_the_mean_distance_between_images():
    x = 0.25 + 0.5 * torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the ball stays inside
    result = layer_robustness(identity_classifier(), x, count=4, eps=0.5, steps=5, step_size=0.25,
                              generator=torch.Generator().manual_seed(1), batch_size=16)
    assert list(result) == ["representation"]
    measured = result["representation"]
    assert measured["worst_case"] == pytest.approx(0.5, abs=1e-4)  # every step ends on the sphere of radius eps
    # The denominator pairs every image with another one: about sqrt(2 d var) for independent uniform pixels.
    expected_between = (2 * 192 * 0.5 ** 2 / 12) ** 0.5
    assert measured["between_images"] == pytest.approx(expected_between, rel=0.05)
    assert measured["R"] == pytest.approx(0.5 / measured["between_images"], rel=1e-6)


def test_r_of_a_layer_that_scales_its_input_scales_the_worst_case_not_r():
    x = 0.25 + 0.5 * torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    scaled = identity_classifier()
    scaled.body = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        scaled.body[0].weight.copy_(3 * torch.eye(3).view(3, 3, 1, 1))
    result = layer_robustness(scaled, x, count=1, eps=0.5, steps=5, step_size=0.25,
                              generator=torch.Generator().manual_seed(1))
    first = result["layer1 (ReLU)"]
    assert first["worst_case"] == pytest.approx(1.5, abs=1e-3)  # 3x the radius (inputs positive: ReLU is identity)
    plain = layer_robustness(identity_classifier(), x, count=1, eps=0.5, steps=5, step_size=0.25,
                             generator=torch.Generator().manual_seed(1))["representation"]
    assert first["R"] == pytest.approx(plain["R"], rel=1e-3)


def test_inverting_the_identity_from_noise_recovers_the_goal_image():
    goal = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    z, stats = invert(identity_classifier(), goal, noise, steps=100, step_size=0.2)
    assert (stats["representation_distance"] < stats["start_distance"] / 20).all()
    assert pixel_correlation(z, goal).min().item() > 0.99
    assert pixel_correlation(noise, goal).abs().max().item() < 0.3


def test_pixel_correlation_ignores_brightness_and_contrast():
    a = torch.rand(3, 3, 8, 8)
    assert torch.allclose(pixel_correlation(a, 0.2 + 0.5 * a), torch.ones(3), atol=1e-5)
    assert torch.allclose(pixel_correlation(a, 1 - a), -torch.ones(3), atol=1e-5)


def test_the_report_rows_read_the_measures_and_claim_the_robust_model_is_more_stable():
    def record(standard: float, robust: float, corr_standard: float, corr_robust: float) -> dict:
        layers = lambda rep: {"layer1 (GELU)": {"R": 0.1}, "representation": {"R": rep}}  # noqa: E731
        return {"layer_robustness": {"results": {"models": {"standard": {"layers": layers(standard)},
                                                            "adversarial_l2": {"layers": layers(robust)}}}},
                "inversion": {"results": {"models": {
                    "standard": {"pixel_correlation": corr_standard, "own_label_rate": 1.0},
                    "adversarial_l2": {"pixel_correlation": corr_robust, "own_label_rate": 0.9}}}}}

    rows = claims.section_55()
    held = {r["id"]: (r["suite"], r["holds"]) for r in claims.evaluate(record(0.9, 0.3, 0.1, 0.6), rows)}
    assert held["layer_robustness.adversarial_l2.representation"] == (0.3, True)
    assert held["layer_robustness.standard.layer1"] == (0.1, None)
    assert held["inversion.adversarial_l2.pixel_correlation"] == (0.6, True)
    failed = {r["id"]: r["holds"] for r in claims.evaluate(record(0.3, 0.9, 0.6, 0.1), rows)}
    assert failed["layer_robustness.adversarial_l2.representation"] is False
    assert failed["inversion.adversarial_l2.pixel_correlation"] is False
    assert all(r["holds"] is None for r in claims.evaluate({}, rows))  # not run: None, never an error
