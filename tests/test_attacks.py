"""Tests of the PGD engine and its evaluation helpers (attacks/).

Closed-form checks on a linear classifier, invariants on small random conv nets, behaviour under the
grad modes Lightning uses, and a cross-check against torchattacks on real CIFAR-10 images.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks import (
    AttackConfig,
    attack_success_rate,
    cross_entropy_loss,
    fgsm_rs,
    pgd,
    point_key,
    predict,
    robust_accuracy,
    targeted_transfer_rate,
)
from common.datasets import CIFAR10_MEAN as MEAN
from common.datasets import CIFAR10_STD as STD
from models.networks import Normalize

# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: with several threads each op waits on thread synchronisation, which costs up
    to 100x on a machine whose cores are busy with other work. One thread is as fast when idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cnn(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """A tiny random conv net with BatchNorm (so eval/train mode matters) for 3x8x8 inputs."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 4 * 4, num_classes),
        )  # fmt: skip
        # Non-trivial BatchNorm statistics, so train mode (batch statistics) would change the function.
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def images(n: int = 16, seed: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [0, 1] (some pixels exactly on the bounds) and random labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[:, :, 0, 0], x[:, :, -1, -1] = 0.0, 1.0  # clamping must be active somewhere
    return x, torch.randint(0, 10, (n,), generator=g)


def per_example_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model.eval()(x), y, reduction="none")


def linear_problem(n: int = 200, d: int = 20, margin: float = 0.3, seed: int = 0):
    """A 2-logit linear classifier, logits ``[0, w.x + b]``, and points in ~[0.4, 0.6]^d whose margins
    ``|w.x + b|`` all equal ``margin``; labels are the model's (correct) predictions.

    The smallest perturbation that flips a point has L2 norm ``margin / ||w||_2`` and Linf norm
    ``margin / ||w||_1`` (Hoelder duality); the points are far from the [0, 1] bounds: clamping never binds.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    b = -0.5 * w.sum()  # the decision boundary passes through the centre of the cube
    x = 0.45 + 0.1 * torch.rand(n, d, generator=g)
    side = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)
    x = x + ((margin * side - (x @ w + b)) / (w @ w))[:, None] * w  # move along w to the exact margin
    model = nn.Linear(d, 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros(d), w]))
        model.bias.copy_(torch.tensor([0.0, b.item()]))
    return model, x, (side > 0).long(), w


# --------------------------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("use_best", [True, False])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_linear_classifier_flips_exactly_beyond_the_minimal_perturbation(norm, use_best):
    margin = 0.3
    model, x, y, w = linear_problem(margin=margin)
    assert x.min() > 0.3 and x.max() < 0.7  # far from the bounds
    assert (model(x).argmax(1) == y).all()
    minimal = margin / (w.norm(p=2) if norm == "l2" else w.norm(p=1)).item()
    for factor, expected in [(1.05, 1.0), (0.95, 0.0)]:
        eps = factor * minimal
        x_adv = pgd(model, x, y, norm=norm, eps=eps, step_size=2.5 * eps / 10, steps=10, use_best=use_best)
        flipped = (model(x_adv).argmax(1) != y).float().mean().item()
        if expected:
            assert flipped >= 0.99, f"{norm} eps={factor}*minimal flipped only {flipped:.2%}"
        else:
            assert flipped == 0.0, f"{norm} eps={factor}*minimal flipped {flipped:.2%}: projection is wrong"


def test_use_best_considers_the_final_iterate():
    # On a linear model every step increases the loss: the best iterate of a 1-step attack is its last one.
    model, x, y, _ = linear_problem()
    kw = dict(norm="l2", eps=0.05, step_size=0.05, steps=1)
    assert torch.equal(pgd(model, x, y, use_best=True, **kw), pgd(model, x, y, use_best=False, **kw))
    assert not torch.equal(pgd(model, x, y, **kw), x)


def test_unconstrained_l2_descent_reaches_a_target_point():
    # Representation-inversion mode: eps=inf, custom loss, minimised (targeted); only the bounds clamp.
    g = torch.Generator().manual_seed(0)
    x, target = torch.rand(4, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)

    def distance(model, x_adv, goal):
        return (x_adv - goal).flatten(1).pow(2).sum(1)

    start = (x - target).flatten(1).norm(dim=1)
    assert start.min() > 5  # far outside any ball an attack would use
    x_adv = pgd(nn.Identity(), x, target, norm="l2", eps=math.inf, step_size=0.1, steps=150,
                targeted=True, loss_fn=distance)  # fmt: skip
    # Fixed-length normalised steps end within one step of the goal.
    assert (x_adv - target).flatten(1).norm(dim=1).max() <= 0.1


# -------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize(
    ("norm", "random_start"), [("l2", False), ("l2", True), ("l2", "sphere"), ("linf", False), ("linf", True)]
)
def test_outputs_stay_in_the_ball_and_the_bounds(norm, random_start, targeted):
    model, (x, y) = small_cnn(), images()
    eps = 0.5 if norm == "l2" else 8 / 255
    x_adv = pgd(model, x, y, norm=norm, eps=eps, step_size=eps / 2, steps=5, targeted=targeted,
                random_start=random_start, generator=torch.Generator().manual_seed(0))  # fmt: skip
    delta = (x_adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert size.max() <= eps * (1 + 1e-5)
    assert size.max() >= 0.5 * eps  # the attack moved
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_targeted_attack_raises_the_target_probability(norm):
    model, (x, y) = small_cnn(), images(32)
    target = (y + 1) % 10
    eps = 2.0 if norm == "l2" else 32 / 255
    x_adv = pgd(model, x, target, norm=norm, eps=eps, step_size=eps / 4, steps=10, targeted=True)
    with torch.no_grad():
        before = model(x).softmax(1).gather(1, target[:, None]).squeeze(1)
        after = model(x_adv).softmax(1).gather(1, target[:, None]).squeeze(1)
        hits_before = (model(x).argmax(1) == target).float().mean()
        hits_after = (model(x_adv).argmax(1) == target).float().mean()
    assert (after >= before - 1e-6).all()  # use_best never returns something worse than the start
    assert (after > before).float().mean() > 0.9
    assert hits_after > hits_before + 0.2


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_use_best_is_never_worse_than_the_last_iterate(norm, targeted):
    model, (x, y) = small_cnn(), images(32)
    # A large step makes the trajectory oscillate, so the last iterate is often not the best one.
    kw = dict(norm=norm, eps=2.0 if norm == "l2" else 0.1, steps=6, targeted=targeted)
    kw["step_size"] = kw["eps"]
    best = per_example_ce(model, pgd(model, x, y, use_best=True, **kw), y)
    last = per_example_ce(model, pgd(model, x, y, use_best=False, **kw), y)
    if targeted:
        assert (best <= last + 1e-5).all()
    else:
        assert (best >= last - 1e-5).all()


def test_model_modes_parameter_grads_and_batchnorm_statistics_are_untouched():
    model, (x, y) = small_cnn(), images()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model: its own mode must survive too
    stats = model[1].running_mean.clone(), model[1].running_var.clone()
    pgd(model, x, y, norm="l2", eps=0.5, step_size=0.1, steps=3)
    assert model.training and model[0].training and not model[1].training
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].running_var, stats[1])
    assert all(p.grad is None for p in model.parameters())

    # Pre-existing gradients (e.g. gradient accumulation inside training_step) are left exactly as they were.
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    pgd(model, x, y, norm="linf", eps=8 / 255, step_size=2 / 255, steps=3)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_model_mode_is_restored_when_the_loss_raises():
    model, (x, y) = small_cnn().train(), images()

    def broken(model, x_adv, y):
        assert not model.training, "the attack must run the model in eval mode"
        raise KeyError("boom")

    with pytest.raises(KeyError):
        pgd(model, x, y, norm="l2", eps=0.5, step_size=0.1, steps=3, loss_fn=broken)
    assert all(m.training for m in model.modules())


def test_seeded_random_start_is_reproducible():
    model, (x, y) = small_cnn(), images()

    def run(seed, random_start):
        return pgd(model, x, y, norm="l2", eps=0.5, step_size=0.1, steps=3, random_start=random_start,
                   generator=torch.Generator().manual_seed(seed))  # fmt: skip

    for random_start in (True, "sphere"):
        assert torch.equal(run(0, random_start), run(0, random_start))
        assert not torch.equal(run(0, random_start), run(1, random_start))


def _start_deltas(norm: str, eps: float, random_start, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Random starts alone: with steps=0 pgd returns its starting point."""
    x = torch.full((n, *shape), 0.5)
    g = torch.Generator().manual_seed(0)
    out = pgd(nn.Identity(), x, torch.zeros(n, dtype=torch.long), norm=norm, eps=eps, step_size=0.1, steps=0,
              random_start=random_start, generator=g)  # fmt: skip
    return (out - x).flatten(1)


def test_l2_random_start_is_uniform_in_the_ball():
    d, eps = 3, 0.2
    delta = _start_deltas("l2", eps, True, 4000, (d,))
    radius = delta.norm(dim=1)
    assert radius.max() <= eps * (1 + 1e-6)
    # Uniform in the ball <=> (r / eps)^d ~ U(0, 1); a radius uniform in [0, eps] (torchattacks) fails this.
    u = (radius / eps) ** d
    for q in (0.25, 0.5, 0.75):
        assert abs(u.quantile(q).item() - q) < 0.03
    assert abs(radius.median().item() - eps * 0.5 ** (1 / d)) < 0.02 * eps
    # Isotropic directions: the mean unit vector is near zero.
    assert (delta / radius[:, None]).mean(0).norm() < 0.05


def test_sphere_random_start_lies_on_the_sphere_and_linf_start_fills_the_box():
    eps = 0.2
    sphere = _start_deltas("l2", eps, "sphere", 256, (3, 8, 8))
    assert torch.allclose(sphere.norm(dim=1), torch.full((256,), eps), atol=1e-5)
    box = _start_deltas("linf", eps, True, 256, (3, 8, 8))
    assert box.abs().max() <= eps
    assert abs(box.mean().item()) < 0.01 and abs(box.std().item() - eps / math.sqrt(3)) < 0.01


def test_zero_steps_returns_a_copy_of_the_input():
    model, (x, y) = small_cnn(), images()
    out = pgd(model, x, y, norm="linf", eps=8 / 255, step_size=2 / 255, steps=0)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_early_stop_stops_once_every_example_is_fooled():
    model, (x, y) = small_cnn(), images(8)
    calls = []
    counting = nn.Sequential(model)
    counting.register_forward_hook(lambda *_: calls.append(1))
    kw = dict(norm="l2", eps=3.0, step_size=1.0, steps=20)
    x_adv = pgd(counting, x, y, early_stop=True, use_best=False, **kw)
    assert (model(x_adv).argmax(1) != y).all()
    assert len(calls) < 20
    # With a custom loss (no logits at hand) the success check costs one extra forward per step.
    calls.clear()
    x_adv = pgd(counting, x, y, early_stop=True, use_best=False, loss_fn=cross_entropy_loss, **kw)
    assert (model(x_adv).argmax(1) != y).all() and len(calls) < 40
    calls.clear()
    pgd(counting, x, y, **kw)
    assert len(calls) == 21  # 20 steps + the final iterate's loss for use_best


# ----------------------------------------------------------------------------------------- grad modes


def test_inference_mode_raises_a_clear_error_and_no_grad_works():
    model, (x, y) = small_cnn(), images()
    kw = dict(norm="linf", eps=8 / 255, step_size=2 / 255, steps=3)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"Trainer\(inference_mode=False\)"):
        pgd(model, x, y, **kw)
    with torch.no_grad():
        x_adv = pgd(model, x, y, **kw)
    assert not torch.equal(x_adv, x)
    assert per_example_ce(model, x_adv, y).mean() > per_example_ce(model, x, y).mean()

    with torch.inference_mode():  # tensors made under inference mode (e.g. by a test loop) are accepted
        xi, yi = x.clone(), y.clone()
    assert torch.equal(pgd(model, xi, yi, **kw), x_adv)


def test_lightning_validate_needs_inference_mode_off():
    pl = pytest.importorskip("pytorch_lightning")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = small_cnn().train()

        def training_step(self, batch, _):
            x, y = batch
            x_adv = pgd(self.net, x, y, norm="l2", eps=0.5, step_size=0.2, steps=2)
            assert self.net.training  # back in train mode for the training forward
            return F.cross_entropy(self.net(x_adv), y)

        def validation_step(self, batch, _):
            x, y = batch
            x_adv = pgd(self.net, x, y, norm="l2", eps=0.5, step_size=0.2, steps=2)
            self.log("adv_acc", (self.net(x_adv).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*images(32)), batch_size=8)
    kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = Module()
    pl.Trainer(max_steps=4, accumulate_grad_batches=2, limit_val_batches=0, **kw).fit(module, data)
    with pytest.raises(RuntimeError, match=r"inference_mode=False"):
        pl.Trainer(**kw).validate(module, data)
    results = pl.Trainer(inference_mode=False, **kw).validate(module, data)
    assert 0.0 <= results[0]["adv_acc"] <= 1.0


# ------------------------------------------------------------------------------------------- arguments


def _with_nan():
    x, y = images()
    x[0, 0, 0, 0] = float("nan")
    return x, y


def _normalised_outside_the_model():
    x, y = images()
    return (x - 0.5) / 0.25, y


def _labels(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize(
    ("kwargs", "make_data", "message"),
    [
        (dict(norm="l1"), images, "unknown norm"),
        (dict(eps=0.0), images, "eps must be a positive"),
        (dict(eps=-1.0), images, "eps must be a positive"),
        (dict(eps=float("nan")), images, "eps must be a positive"),
        (dict(step_size=0.0), images, "step_size"),
        (dict(steps=-1), images, "steps must be"),
        (dict(steps=2.5), images, "steps must be"),
        (dict(norm="linf", eps=8.0), images, "did you mean eps=8.0/255"),
        (dict(random_start="gauss"), images, "random_start must be"),
        (dict(eps=math.inf, random_start=True), images, "finite eps"),
        (dict(norm="linf", eps=0.03, random_start="sphere"), images, "'sphere' is for norm='l2'"),
        (dict(bounds=(1.0, 0.0)), images, "low < high"),
        (dict(channels_last=True), lambda: (torch.rand(4, 10), _labels(4)), "4D"),
        (dict(), lambda: (torch.rand(4, 3, 8, 8), _labels(3)), "batch dimension"),
        (dict(), lambda: (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), _labels(4)), "floating"),
        (dict(), _with_nan, "NaN"),
        (dict(), _normalised_outside_the_model, "outside bounds"),
        (dict(loss_fn=lambda m, x, y: F.cross_entropy(m(x), y)), images, "per example"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, make_data, message):
    args = {**dict(norm="l2", eps=0.5, step_size=0.1, steps=2), **kwargs}
    with pytest.raises(ValueError, match=message):
        pgd(small_cnn(), *make_data(), **args)


def test_attack_config_validates_and_runs_pgd():
    with pytest.raises(ValueError, match="unknown norm"):
        AttackConfig(norm="L2", eps=0.5, step_size=0.1, steps=7)
    config = AttackConfig(norm="l2", eps=0.5, step_size=0.1, steps=7)
    model, (x, y) = small_cnn(), images()
    expected = pgd(model, x, y, norm="l2", eps=0.5, step_size=0.1, steps=7, targeted=True)
    assert torch.equal(config.run(model, x, y, targeted=True), expected)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_with_random_start_stays_in_the_ball_and_raises_the_loss(norm):
    model, (x, y) = small_cnn(), images(64)
    eps = 8 / 255 if norm == "linf" else 0.5
    x_adv = fgsm_rs(model, x, y, eps=eps, norm=norm, generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    assert (delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)).max() <= eps * (1 + 1e-5)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert per_example_ce(model, x_adv, y).mean() > per_example_ce(model, x, y).mean()


# ------------------------------------------------------------------------------------------- evaluation


def test_robust_accuracy_matches_the_closed_form_and_is_batch_independent():
    model, x, y, w = linear_problem(n=60)
    minimal = 0.3 / w.norm().item()
    points = [("l2", 0.0), ("l2", 0.95 * minimal), ("l2", 1.05 * minimal)]
    result = robust_accuracy(model, x, y, points, steps=10)
    assert list(result) == [point_key(*p) for p in points]
    assert result == {"l2_0": 1.0, point_key("l2", 0.95 * minimal): 1.0, point_key("l2", 1.05 * minimal): 0.0}
    assert robust_accuracy(model, x, y, points, steps=10, batch_size=7) == result
    assert robust_accuracy(model, x, y, points + points[:1], steps=10) == result  # a repeat counts once
    with pytest.raises(ValueError, match="share the key"):
        robust_accuracy(model, x, y, [("linf", 8 / 255), ("linf", 0.0314)])
    assert point_key("linf", 8 / 255) == "linf_0.0314" and point_key("l2", 0.25) == "l2_0.25"


def test_robust_accuracy_is_monotone_and_starts_at_clean_accuracy():
    model, (x, y) = small_cnn(), images(48)
    y = predict(model, x)  # labels = predictions, so some points survive small attacks
    y[:8] = (y[:8] + 1) % 10  # and a few are misclassified from the start
    points = [("linf", 0.0), ("linf", 1 / 255), ("linf", 4 / 255), ("linf", 16 / 255)]
    result = list(robust_accuracy(model, x, y, points, steps=5, batch_size=16).values())
    assert result[0] == pytest.approx(40 / 48)
    assert all(a >= b for a, b in zip(result, result[1:], strict=False)) and result[-1] < result[0]
    with pytest.raises(ValueError, match="untargeted"):
        robust_accuracy(model, x, y, points, targeted=True)


def test_success_and_transfer_rates_count_the_right_predictions():
    constant = nn.Linear(5, 10)  # always predicts class 3
    with torch.no_grad():
        constant.weight.zero_()
        constant.bias.copy_(torch.arange(10) == 3)
    x_adv = torch.rand(8, 5)
    threes, half = torch.full((8,), 3), torch.tensor([3, 3, 3, 3, 0, 1, 2, 4])
    assert targeted_transfer_rate(x_adv, threes, constant) == 1.0
    assert targeted_transfer_rate(x_adv, half, constant) == 0.5
    assert attack_success_rate(constant, x_adv, half, targeted=True, batch_size=3) == 0.5
    assert attack_success_rate(constant, x_adv, threes, targeted=False) == 0.0
    assert attack_success_rate(constant, x_adv, half, targeted=False) == 0.5


# ----------------------------------------------------------------------- real CIFAR-10 and torchattacks


@pytest.fixture(scope="module")
def cifar_cnn(cifar):
    """A small CNN trained for one epoch on 20k real CIFAR-10 images (~40% test accuracy), and 500 test
    images in [0, 1]. ``cifar`` (conftest.py) holds the real arrays from $BOF_DATA_DIR."""
    train_x, train_y, test_x, test_y = cifar

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(Normalize(MEAN, STD), *block(3, 32), *block(32, 64), *block(64, 128),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))  # fmt: skip
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        x, y = train_x[:20000].float() / 255, train_y[:20000]
        for idx in torch.randperm(len(x)).split(128):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval(), test_x[:500].float() / 255, test_y[:500]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x) == y).float().mean().item()


@pytest.mark.parametrize(("norm", "eps", "step_size"), [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
def test_pgd_is_at_least_as_strong_as_torchattacks_on_cifar10(cifar_cnn, norm, eps, step_size):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = cifar_cnn
    clean = _accuracy(model, x, y)
    assert clean > 0.3, f"the quickly trained CNN should beat chance clearly, got {clean:.1%}"

    attack_class = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    theirs = attack_class(model, eps=eps, alpha=step_size, steps=10, random_start=False)
    timings, accuracy, adversarial = {}, {}, {}
    kw = dict(norm=norm, eps=eps, step_size=step_size, steps=10)
    runs = {
        "torchattacks": lambda: theirs(x, y),
        "ours_last": lambda: pgd(model, x, y, use_best=False, **kw),
        "ours_best": lambda: pgd(model, x, y, use_best=True, **kw),
    }
    for name, run in runs.items():
        start = time.perf_counter()
        adversarial[name] = run()
        timings[name] = time.perf_counter() - start
        accuracy[name] = _accuracy(model, adversarial[name], y)
    print(f"\n{norm} eps={eps:.4g}: clean {clean:.1%}; robust accuracy "
          + ", ".join(f"{k} {accuracy[k]:.1%} ({timings[k]:.2f}s)" for k in runs))  # fmt: skip

    assert accuracy["torchattacks"] < clean - 0.1  # the comparison is not vacuous
    # Without use_best our steps are torchattacks' steps: the examples agree up to float rounding.
    same = ((adversarial["ours_last"] - adversarial["torchattacks"]).flatten(1).abs().amax(1) < 1e-4).float()
    assert same.mean() >= 0.9
    for name in ("ours_last", "ours_best"):
        assert accuracy[name] <= accuracy["torchattacks"] + 0.01, f"{name} is weaker than torchattacks"
    # robust_accuracy (clean-correct AND attacked-correct) can only be lower than accuracy on the attack.
    ours = robust_accuracy(model, x, y, [(norm, eps)], steps=10, step_size=step_size)[point_key(norm, eps)]
    assert ours <= accuracy["ours_best"] + 0.01


def test_bf16_autocast_and_channels_last_match_fp32_success(cifar_cnn):
    model, x, y = cifar_cnn
    correct = predict(model, x) == y
    x, y = x[correct][:100], y[correct][:100]  # success then means the attack flipped the prediction
    kw = dict(norm="l2", eps=0.3, step_size=0.075, steps=5)
    fp32 = pgd(model, x, y, **kw)
    bf16 = pgd(model, x, y, autocast_dtype=torch.bfloat16, channels_last=True, **kw)
    assert bf16.dtype == torch.float32 and bf16.is_contiguous()  # the iterate itself stays fp32
    assert (bf16 - x).flatten(1).norm(dim=1).max() <= 0.3 * (1 + 1e-5)
    rate32 = attack_success_rate(model, fp32, y, targeted=False)
    rate16 = attack_success_rate(model, bf16, y, targeted=False)
    assert 0.2 < rate32 < 0.8  # an eps where the two success rates could differ
    assert abs(rate16 - rate32) <= 0.05, f"bf16 success {rate16:.2f} vs fp32 {rate32:.2f}"
