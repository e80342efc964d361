"""Wallace, "Learning from incorrectly labelled data" (SPEC 5.3): images labelled by a source model's predictions,
optionally only the ones it gets wrong, and an MNIST model labelling Fashion-MNIST."""

from __future__ import annotations

import pytest
import torch
from helpers import N, Synthetic, write_checkpoint

from common.datasets import MNIST_MEAN, MNIST_STD
from common.errors import ConfigError
from datamodules import ConstructedDataModule, RelabelByPrediction
from datamodules.constructed import GenerationError
from datamodules.mnist import load_idx_dataset
from models import load_source


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("source") / "source.ckpt", seed=1)


def relabelled(ckpt, tmp_path, **recipe) -> Synthetic:
    dm = Synthetic([str(ckpt)], RelabelByPrediction(**recipe), cache_dir=str(tmp_path / "cache"), shard_size=16,
                   generation_batch_size=8, progress_bar=False)
    dm.setup("fit")
    return dm


def predictions(ckpt, x: torch.Tensor) -> torch.Tensor:
    model = load_source(str(ckpt)).model.eval()
    with torch.no_grad():
        return model(x).argmax(1)


def test_only_the_images_the_source_gets_wrong_are_kept_with_its_wrong_labels(ckpt, tmp_path):
    dm = relabelled(ckpt, tmp_path)
    clean_x, clean_y = dm.clean_train
    clean_x = clean_x.float() / 255
    predicted = predictions(ckpt, clean_x)
    wrong = predicted != clean_y
    assert 0 < int(wrong.sum()) < N  # a random network: some right, some wrong, so the selection is not vacuous
    x, y = dm.train
    assert len(y) == int(wrong.sum()) == dm.record()["trained_examples"] and dm.record()["keep"] == "wrong"
    assert torch.equal(y, predicted[wrong]) and torch.equal(x, clean_x[wrong])  # the images themselves, unchanged
    assert dm.constructed.stats["wrong"].sum() == wrong.sum() and len(dm.constructed.y) == N  # the cache: all N


def test_every_image_with_the_source_label_when_not_only_wrong(ckpt, tmp_path):
    dm = relabelled(ckpt, tmp_path, only_wrong=False)
    x, y = dm.train
    assert len(y) == N and torch.equal(y, predictions(ckpt, dm.clean_train[0].float() / 255))


def test_moments_of_mnist_gives_the_images_mnists_pixel_mean_and_std(ckpt, tmp_path):
    dm = relabelled(ckpt, tmp_path, only_wrong=False, moments_of="mnist")
    x, y = dm.train
    assert x.mean().item() == pytest.approx(MNIST_MEAN[0], abs=1e-4)
    assert x.std().item() == pytest.approx(MNIST_STD[0], abs=1e-4)
    assert torch.equal(y, predictions(ckpt, x))  # labelled after the rescaling, as trained on
    plain = relabelled(ckpt, tmp_path / "plain", only_wrong=False)
    assert plain.constructed.manifest["key"] != dm.constructed.manifest["key"]


def test_a_source_that_gets_everything_right_leaves_nothing_to_train_on(ckpt, tmp_path):
    class AlwaysRight(RelabelByPrediction):
        def __call__(self, sources, batch):
            out = super().__call__(sources, batch)
            return out._replace(y=batch.y.clone(), stats={**out.stats, "wrong": torch.zeros(len(batch.y))})

    dm = Synthetic([str(ckpt)], AlwaysRight(), cache_dir=str(tmp_path / "cache"), shard_size=16,
                   generation_batch_size=8, progress_bar=False)
    with pytest.raises(GenerationError, match="nothing to train on"):
        dm.setup("fit")


def test_bad_moments_and_datasets_are_refused_by_name(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="moments_of"):
        RelabelByPrediction(moments_of="svhn")
    with pytest.raises(ConfigError, match="data.init_args.test_images"):
        ConstructedDataModule([str(ckpt)], RelabelByPrediction(), test_images="svhn", cache_dir=str(tmp_path))


def test_fashion_mnist_training_images_with_the_mnist_test_set(ckpt, tmp_path, data_dir):
    dm = ConstructedDataModule([str(ckpt)], RelabelByPrediction(only_wrong=False), images="fashion_mnist",
                               test_images="mnist", data_dir=str(data_dir), cache_dir=str(tmp_path))
    train_x, train_y, test_x, test_y = dm.load()
    fashion, mnist = load_idx_dataset("fashion_mnist", data_dir), load_idx_dataset("mnist", data_dir)
    assert torch.equal(train_x, fashion[0]) and torch.equal(train_y, fashion[1])
    assert torch.equal(test_x, mnist[2]) and torch.equal(test_y, mnist[3])


# ------------------------------------------------------------------------------------------- the 2-D toy (c)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 1000) -> torch.nn.Module:
    """A 2-100-100-2 ReLU MLP, 1000 full-batch Adam steps of lr 1e-2 (Wallace gives no sizes: our choice)."""
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(2, 100), torch.nn.ReLU(), torch.nn.Linear(100, 100), torch.nn.ReLU(),
                              torch.nn.Linear(100, 2))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
    return mlp.eval()


def toy_student_right(seed: int) -> int:
    """One toy: how many of its 32 original points the student trained on the attacked ones gets right."""
    from attacks import pgd

    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(32, 2, generator=gen), torch.randint(0, 2, (32,), generator=gen)
    mlp = fit_mlp(x, y, seed)
    assert (mlp(x).argmax(1) == y).all()  # it fits 32/32
    x_adv = pgd(mlp, x, 1 - y, norm="linf", eps=0.12, step_size=0.01, steps=100, targeted=True)
    flipped = mlp(x_adv).argmax(1)
    assert (flipped == 1 - y).float().mean() >= 0.7, seed  # most predictions flip
    student = fit_mlp(x_adv, flipped, seed + 100)
    return int((student(x).argmax(1) == y).sum())


def test_the_2d_toy_a_model_trained_only_on_adversarial_flips_gets_most_points_right():
    """SPEC 5.3 (c): 32 random points of [0,1]^2 with random binary labels, an MLP fits them; Linf eps 0.12 PGD
    towards the other label flips the predictions (Wallace: every one; this smoother MLP: 75-97% of them); a fresh
    MLP trained only on the attacked points, labelled with the model's predictions there, still classifies most
    original points correctly (Wallace: 23/32; chance 16/32). Measured: 20-25 of 32 over the 5 seeds, mean 23.2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-D points: threads only add overhead
    try:
        right = [toy_student_right(seed) for seed in range(5)]
    finally:
        torch.set_num_threads(threads)
    print(f"\nstudent right on the original points (of 32), per seed: {right}")
    assert sum(right) / len(right) >= 20, right  # far above chance (16), in the mean over 5 toys


# ------------------------------------------------------------------------------------------ the report's rows


def test_the_report_checks_the_error_set_against_the_labeller_and_the_students_against_chance():
    from pipeline import claims

    def trained(acc: float, **extra) -> dict:
        return {"kind": "train", "results": {"test": {"metrics": {"test/acc": acc}, "sweep": []}}, **extra}

    errors = {"examples": 50_000, "trained_examples": 18_768, "keep": "wrong"}  # Wallace's numbers
    records = {"wallace_labeller": trained(0.631), "wallace_errors": trained(0.497, constructed=errors),
               "mnist_cnn": trained(0.991), "wallace_fashion": trained(0.945), "wallace_fashion_moments": trained(0.25)}
    rows = {r["id"]: r for r in claims.evaluate(records)}
    assert rows["wallace_errors.examples"]["suite"] == 18_768 and rows["wallace_errors.examples"]["percent"] is False
    assert rows["wallace_errors.error_rate"]["suite"] == pytest.approx(0.37536)
    assert rows["wallace_errors.error_rate"]["holds"] is True  # 37.5% of the set, the labeller errs on 36.9%
    assert rows["wallace_errors.clean"]["holds"] is True and rows["wallace_fashion.clean"]["holds"] is True
    assert rows["wallace_fashion_moments.clean"]["holds"] is False  # 25% is not three times chance
    # A set much smaller than the labeller's errors (a wrong selection) fails the check.
    wrong = {**records, "wallace_errors": trained(0.497, constructed={**errors, "trained_examples": 5_000})}
    assert {r["id"]: r for r in claims.evaluate(wrong)}["wallace_errors.error_rate"]["holds"] is False
