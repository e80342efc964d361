"""Adversarial squares (SPEC 4.3): the distribution, the linear classifier's radius, the flip measurement, and
the callback end to end through the Trainer."""

import importlib
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

import lightning_modules
from attacks import PixelMeanClassifier, attack_squares, flipped_by_attack, linear_radius
from datamodules import SquaresDataModule, make_squares
from lightning_modules import ClassifierModule, RecalibrateBatchNorm, SquaresRobustness
from lightning_modules.callbacks import recalibrate_batchnorm
from lightning_modules.squares import load_runs, squares_figure

REPO = Path(__file__).resolve().parents[1]
SMALL = (3, 8, 8)


def squares(seed=0, **kw):
    dm = SquaresDataModule(**{"train_size": 4000, "test_size": 1000, "image_shape": SMALL, "seed": seed, **kw})
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------- the distribution


def test_distribution_statistics():
    dm = squares()
    x, y = dm.train
    assert x.shape == (4000, *SMALL) and x.dtype == torch.float32 and y.dtype == torch.long
    assert set(y.unique().tolist()) == {0, 1}
    assert abs(y.float().mean().item() - 0.5) < 0.04, "labels are not balanced"
    flipped = dm.train_flipped
    assert abs(flipped.float().mean().item() - 0.1) < 0.02, "the sign-flip (label noise) rate is not 0.1"
    assert abs(dm.test_flipped.float().mean().item() - 0.1) < 0.04
    # Every pixel has the sign of Y * s and magnitude 1 + u, u uniform in [-0.1, 0.1]: the images are not in [0, 1].
    y_pm = (2 * y - 1).float() * torch.where(flipped, -1.0, 1.0)
    assert torch.equal(x.sign(), y_pm.view(-1, 1, 1, 1).expand_as(x))
    noise = x.abs() - 1
    assert noise.min() >= -0.1 - 1e-6 and noise.max() <= 0.1 + 1e-6
    assert noise.min() < -0.099 and noise.max() > 0.099, "the noise does not fill [-0.1, 0.1]"
    assert abs(noise.mean().item()) < 0.002 and abs(noise.std().item() - 0.2 / 12**0.5) < 0.002  # uniform
    assert x.min() < -1.0 and x.max() > 1.0
    # The label is the clean Y: the images of flipped points look like the other class.
    assert torch.equal((x.flatten(1).mean(1) > 0).long() == y, ~flipped)


def test_distribution_is_deterministic_in_the_seed():
    a, b, c = squares(seed=0), squares(seed=0), squares(seed=1)
    for split in ("train", "test"):
        assert torch.equal(getattr(a, split)[0], getattr(b, split)[0])
        assert torch.equal(getattr(a, split)[1], getattr(b, split)[1])
        assert not torch.equal(getattr(a, split)[0], getattr(c, split)[0])
    assert torch.equal(a.train_flipped, b.train_flipped) and not torch.equal(a.train_flipped, c.train_flipped)
    assert not torch.equal(a.train[0][:1000], a.test[0]), "train and test must be independent draws"
    # The test set does not depend on the training set's size, so runs of different sizes share it.
    assert torch.equal(squares(train_size=100).test[0], a.test[0])


def test_parameters_change_the_distribution_and_bad_ones_are_rejected():
    x, y, flipped = make_squares(500, input_noise=0.0, flip_prob=0.0, image_shape=(1, 4, 4),
                                 generator=torch.Generator().manual_seed(0))
    assert not flipped.any() and torch.equal(x, (2 * y - 1).float().view(-1, 1, 1, 1).expand_as(x))
    with pytest.raises(ValueError, match="input_noise"):
        SquaresDataModule(input_noise=1.0)
    with pytest.raises(ValueError, match="flip_prob"):
        SquaresDataModule(flip_prob=0.5)
    with pytest.raises(ValueError, match="image_shape"):
        SquaresDataModule(image_shape=(3, 0, 32))


def test_validation_split_keeps_the_flip_flags_aligned():
    dm = squares(train_size=1000, val_size=200)
    x, y = dm.train
    assert len(y) == 800 and len(dm.train_flipped) == 800 and len(dm.val[1]) == 200
    assert torch.equal((x.flatten(1).mean(1) > 0).long() == y, ~dm.train_flipped)


# ------------------------------------------------------------------------------------- the linear classifier


def test_linear_radius_is_the_distance_to_the_boundary():
    dm = squares()
    x, _ = dm.test
    r = linear_radius(x)
    # Analytic: all pixels share a sign, so |mean(x)| = mean(|x|) = 1 + mean(u), and >= 1 - input_noise.
    assert torch.allclose(r, x.abs().flatten(1).mean(1))
    assert r.min() >= dm.linear_radius_bound == pytest.approx(0.9)
    assert abs(r.mean().item() - 1) < 0.002
    model = PixelMeanClassifier()
    pred = model(x).argmax(1)
    # The worst Linf perturbation of a mean is a constant shift towards the boundary: just inside the radius it
    # does not flip the prediction, just outside it does.
    towards = -(2 * pred - 1).float().view(-1, 1, 1, 1)
    for scale, flips in ((0.999, False), (1.001, True)):
        moved = model(x + towards * (scale * r).view(-1, 1, 1, 1)).argmax(1)
        assert bool((moved != pred).all()) if flips else bool((moved == pred).all())
    # PGD (bounds=None) reaches exactly that: at an eps inside the range of radii it flips exactly the points
    # whose radius is below eps.
    eps = r.median().item()
    _, flipped = flipped_by_attack(model, x, eps=eps, steps=10)
    clear = (r - eps).abs() > 1e-5  # float ties at the boundary
    assert 0.3 < flipped.float().mean() < 0.7
    assert torch.equal(flipped[clear], (r < eps)[clear])


# ------------------------------------------------------------------------------------------ the flip measurement


class PixelThreshold(nn.Module):
    """Class 1 iff the first pixel exceeds ``threshold``: its Linf radius at x is |x[0] - threshold|."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        z = 50 * (x.flatten(1)[:, :1] - self.threshold)
        return torch.cat([-z, z], dim=1)


def test_flip_measurement_on_a_model_with_a_known_boundary():
    threshold, eps = -1.0, 0.01  # a boundary among negative pixels, where clamping to [0, 1] would be fatal
    distance = torch.linspace(-0.05, 0.05, 101)
    x = torch.full((101, *SMALL), -1.05)
    x[:, 0, 0, 0] = threshold + distance
    pred, flipped = flipped_by_attack(PixelThreshold(threshold), x, eps=eps, steps=10, batch_size=32)
    assert torch.equal(pred, (distance > 0).long())
    clear = (distance.abs() - eps).abs() > 1e-4
    assert torch.equal(flipped[clear], (distance.abs() < eps)[clear])
    assert flipped.sum() >= 15  # 19 points within 0.01 of the boundary, minus ties


def test_attack_does_not_clamp_and_respects_eps():
    x = make_squares(64, image_shape=SMALL, generator=torch.Generator().manual_seed(3))[0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 2))
    y = model(x).argmax(1)
    eps = 0.05
    # One sign step twice as long as eps: the projection must bring every pixel back to exactly eps.
    x_adv = attack_squares(model, x, y, eps=eps, steps=1, step_size=2 * eps)
    delta = (x_adv - x).abs()
    assert delta.max() <= eps + 1e-6
    assert delta.min() >= eps - 1e-6, "some pixel was not moved by the full budget (clamped?)"
    assert x_adv.min() < -1.0 and x_adv.max() > 1.0, "the attack clamped the images into [0, 1]"
    assert torch.equal(x_adv < 0, x < 0)  # eps << 0.9: no pixel changes sign
    with pytest.raises(ValueError, match="eps"):
        flipped_by_attack(model, x, eps=0.0)


# ------------------------------------------------------------------------------------------------- end to end


def test_recalibrate_batchnorm_averages_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten())
    x = torch.randn(60, 3, 6, 6) * 3 + 1
    weight = model[0].weight.clone()
    model[1].running_mean.fill_(100.0)
    model.train()
    assert recalibrate_batchnorm(model, x.split(20)) == 1
    with torch.no_grad():
        expected = torch.stack([model[0](xb).mean((0, 2, 3)) for xb in x.split(20)]).mean(0)
    assert torch.allclose(model[1].running_mean, expected, atol=1e-5)
    assert torch.equal(model[0].weight, weight) and model[1].momentum == 0.1 and model.training
    assert all(m.training for m in model.modules())
    assert recalibrate_batchnorm(nn.Linear(2, 2), []) == 0


def test_fit_and_test_log_the_squares_metrics(tmp_path):
    pl.seed_everything(0)
    dm = SquaresDataModule(train_size=256, test_size=96, image_shape=(3, 16, 16), batch_size=64,
                           eval_batch_size=96)
    model = ClassifierModule(arch="fast_cnn", num_classes=2, mean=[0, 0, 0], std=[1, 1, 1], optimizer="adam",
                             lr=1e-3, weight_decay=0, lr_schedule="constant", arch_kwargs={"widths": [8, 16]})
    out = tmp_path / "out"
    callback = SquaresRobustness(eps=0.01, sweep=(0.1,), steps=3, sweep_examples=32, batch_size=48,
                                 output_dir=str(out))
    # As in configs/*/squares.yaml: last.ckpt, and the checkpoint after the first epoch.
    checkpoints = [pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", save_last=True, filename="{epoch}"),
                   pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", monitor="epoch", mode="min", save_top_k=1,
                                                filename="after_1_epoch", enable_version_counter=False)]
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(max_epochs=2, logger=logger, callbacks=[RecalibrateBatchNorm(examples=128, batch_size=64),
                         *checkpoints, callback], enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    # The statistics are those of the training images after the last step: recomputing them changes nothing.
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    recalibrate_batchnorm(model, dm.train[0][:128].split(64))
    assert all(torch.allclose(a, m.running_mean, atol=1e-5) for a, m in
               zip(stats, [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)], strict=True))

    trainer.test(model, dm, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    metrics = trainer.callback_metrics
    for key in ("flip_fraction", "flip_fraction_correct", "train_acc", "train_acc_flipped_images", "test_acc",
                "linear_radius_mean", "linear_radius_min", "linear_test_acc", "flip_fraction/linf_0.1"):
        assert f"test/squares/{key}" in metrics, key
    assert 0.9 < metrics["test/squares/linear_radius_min"] <= metrics["test/squares/linear_radius_mean"] < 1.1
    assert metrics["test/squares/linear_flip_fraction"] == 0
    logged = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "test/squares/flip_fraction" in logged and "test/squares/train_acc" in logged
    result = json.loads((out / "squares.json").read_text())
    assert result == json.loads((out / "squares_2epochs.json").read_text())
    assert result["trained"]["epochs"] == 2 and result["trained"]["global_step"] == 8
    assert result["trained"]["path"].endswith("last.ckpt")
    assert result["data"]["train_size"] == 256 and result["test_examples"] == 96
    assert [r["eps"] for r in result["curve"]] == [0.01, 0.1] and result["curve"][1]["n"] == 32
    assert result["metrics"]["train_acc"] == pytest.approx(float(metrics["test/squares/train_acc"]))

    # The checkpoint after the first epoch is measured into its own file; the figure then shows both runs.
    trainer.test(model, dm, ckpt_path=str(tmp_path / "ckpt" / "after_1_epoch.ckpt"), verbose=False)
    first = json.loads((out / "squares_1epoch.json").read_text())
    assert first["trained"]["epochs"] == 1 and first["trained"]["global_step"] == 4
    assert json.loads((out / "squares.json").read_text()) == first  # squares.json: the latest measurement
    assert [r["label"] for r in load_runs(out)] == ["fast_cnn, 1 epoch", "fast_cnn, 2 epochs"]
    assert (out / "squares.png").stat().st_size > 1000
    legend = [t.get_text() for t in squares_figure(load_runs(out)).axes[0].get_legend().get_texts()]
    assert legend[:3] == ["fast_cnn, 1 epoch", "fast_cnn, 2 epochs", "linear sign(mean pixel)"]
    with pytest.raises(ValueError, match="at least one run"):
        squares_figure([])


def test_configs_build_the_experiment():
    for name in ("mini/squares.yaml", "cifar10/squares.yaml"):
        config = yaml.safe_load((REPO / "configs" / name).read_text())
        data, model = config["data"]["init_args"], config["model"]["init_args"]
        assert config["data"]["class_path"] == "datamodules.SquaresDataModule"
        assert data["train_size"] == 10_000 and data["input_noise"] == 0.1 and data["flip_prob"] == 0.1
        assert model["num_classes"] == 2 and model["mean"] == [0, 0, 0] and model["std"] == [1, 1, 1]
        assert model["optimizer"] == "adam" and config["trainer"]["max_epochs"] == 20
        callbacks = {c["class_path"].rpartition(".")[2]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]}
        assert callbacks["SquaresRobustness"]["eps"] == 0.01
        for c in config["trainer"]["callbacks"]:  # the classes configs name resolve (also as lightning_modules.X)
            module, _, name = c["class_path"].rpartition(".")
            cls = getattr(importlib.import_module(module), name)
            if module.startswith("lightning_modules"):
                assert getattr(lightning_modules, name) is cls
        checkpoints = [c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("Checkpoint")]
        assert [c.get("save_last", False) for c in checkpoints] == [True, False]
        assert (checkpoints[1]["monitor"], checkpoints[1]["mode"], checkpoints[1]["save_top_k"]) == ("epoch", "min", 1)
