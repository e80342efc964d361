"""Configuration checks that used to be silent or late (hardening issue: "each: one clear error naming both sides
and the fix"): arch_kwargs an architecture does not take, data the model was not built for, a no-op
test_label_shift, a vacuous Linf eps in adversarial training and source lists a recipe cannot use. Every error is
a ConfigError raised before anything is written; the CLI tests check that nothing is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from helpers import Synthetic, experiment_configs, write_checkpoint

from attacks import AttackConfig
from common.errors import ConfigError
from datamodules import (
    CIFAR10DataModule,
    ConstructedDataModule,
    MNISTDataModule,
    NonTransferableAttack,
    RelabelByAttack,
    RepresentationInversion,
    SquaresDataModule,
)
from lightning_modules import AdversarialModule, ClassifierModule
from models import ARCHITECTURES, build_model

REPO = Path(__file__).resolve().parents[1]
TINY = {"arch": "fast_cnn", "arch_kwargs": {"widths": [8, 16, 32]}}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def trainer(root: Path) -> pl.Trainer:
    return pl.Trainer(max_steps=1, limit_train_batches=1, limit_val_batches=1, limit_test_batches=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, inference_mode=False)


# ------------------------------------------------------------------------------------ 1. unknown arch_kwargs


def test_arch_kwargs_the_architecture_does_not_take_are_refused_naming_arch_keys_and_accepted_keys():
    from models import arch_kwargs_of

    # resnet18 used to swallow them (`lambda c, **kw`): a config asking for whitening got a plain ResNet.
    with pytest.raises(ConfigError) as err:
        ClassifierModule(arch="resnet18", arch_kwargs={"whiten": True})
    message = str(err.value)
    assert all(part in message for part in ("['whiten']", "'resnet18'", "takes no arch_kwargs",
                                            "'whiten' is an option of fast_cnn", "fix model.init_args.arch_kwargs"))
    for arch in ("resnet50", "vgg16"):
        with pytest.raises(ConfigError, match=f"not options of architecture '{arch}'"):
            build_model(arch, widths=[8, 16])
    # fast_cnn used to fail with a bare TypeError; now the close match and the accepted keys are named.
    with pytest.raises(ConfigError, match=r"\['widht'\] are not options of architecture 'fast_cnn', which accepts "
                                          r"only widths, pool, whiten, whiten_eps; 'widht': did you mean 'widths'"):
        build_model("fast_cnn", widht=[8, 16, 32])
    assert arch_kwargs_of("resnet18") == () and arch_kwargs_of("fast_cnn") == ("widths", "pool", "whiten",
                                                                              "whiten_eps")
    assert sorted(ARCHITECTURES) == ["fast_cnn", "linear", "resnet18", "resnet50", "simple_cnn", "vgg16"]
    build_model("fast_cnn", widths=[8], pool="avg", whiten=True, whiten_eps=1e-3)  # every accepted key builds


# ------------------------------------------------------------------------------ 2. data the model cannot take


@pytest.fixture(scope="module")
def mnist(data_dir) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(data_dir), train_size=64, batch_size=32)
    dm.setup("fit")  # loaded once; every stage's setup below reuses it
    return dm


@pytest.mark.parametrize("stage", ["fit", "validate", "test"])
def test_mnist_through_a_three_channel_model_is_refused_in_every_stage(mnist, tmp_path, stage):
    # The 3-value normalisation used to broadcast the 1-channel images to 3 channels: it trained without a word.
    model = ClassifierModule(**TINY)
    with pytest.raises(ConfigError, match=r"MNISTDataModule (train|val|test) images have 1 channel\(s\) \(shape "
                                          r"\[1, 28, 28\]\) but the model was built with in_channels=3; fix "
                                          r"model.init_args.in_channels: 1, with 1-value model.init_args.mean and "
                                          r"std \(e.g. mean: \[0.1307\], std: \[0.3081\] for MNIST\)"):
        getattr(trainer(tmp_path), stage)(model, datamodule=mnist)


def test_mnist_with_a_one_channel_model_still_trains(mnist, tmp_path):
    model = ClassifierModule(**TINY, in_channels=1, mean=[0.1307], std=[0.3081])
    trainer(tmp_path).fit(model, datamodule=mnist)


def test_a_class_count_or_labels_the_model_was_not_built_for_are_refused(tmp_path):
    squares = SquaresDataModule(train_size=64, test_size=32, image_shape=(3, 8, 8), batch_size=32)
    with pytest.raises(ConfigError, match="SquaresDataModule has 2 classes but the model was built with "
                                          "num_classes=10; fix model.init_args.num_classes: 2"):
        trainer(tmp_path).fit(ClassifierModule(**TINY), datamodule=squares)
    squares_model = ClassifierModule(**TINY, num_classes=2, mean=[0.0] * 3, std=[1.0] * 3)
    trainer(tmp_path).fit(squares_model, datamodule=squares)  # the squares path is untouched
    # A datamodule without num_classes: the labels themselves are compared with the model's classes.
    loose = SimpleNamespace(train=(torch.rand(8, 3, 8, 8), torch.arange(8)))
    with pytest.raises(ConfigError, match=r"SimpleNamespace train labels lie in \[0, 7\], outside the model's "
                                          r"\[0, 5\) \(num_classes=5\); fix model.init_args.num_classes"):
        ClassifierModule(**TINY, num_classes=5).check_data(loose, "fit")


def test_a_constructed_dataset_is_refused_before_generation_when_the_model_cannot_take_it(tmp_path):
    dm = Synthetic([str(write_checkpoint(tmp_path / "source.ckpt"))], RelabelByAttack("shift", steps=1),
                   cache_dir=str(tmp_path / "cache"), shard_size=16, generation_batch_size=8, progress_bar=False)
    model = ClassifierModule(**TINY, in_channels=1, mean=[0.5], std=[0.25])
    with pytest.raises(ConfigError, match=r"Synthetic train images have 3 channel\(s\).*in_channels=1; fix "
                                          "model.init_args.in_channels: 3"):
        trainer(tmp_path / "run").fit(model, datamodule=dm)
    assert dm.constructed is None and not (tmp_path / "cache").exists()  # nothing generated, nothing written


# --------------------------------------------------------------------------------- 3. a no-op test_label_shift


@pytest.mark.parametrize(("make", "shift", "classes"), [(CIFAR10DataModule, 10, 10), (CIFAR10DataModule, 20, 10),
                                                        (CIFAR10DataModule, -10, 10), (SquaresDataModule, 2, 2)])
def test_a_test_label_shift_that_is_a_multiple_of_the_classes_is_refused(make, shift, classes):
    with pytest.raises(ConfigError) as err:
        make(test_label_shift=shift)
    assert f"test_label_shift={shift} is a multiple of the {classes} classes of {make.__name__}" in str(err.value)
    assert f"(y + {shift}) mod {classes} equal the true labels" in str(err.value)
    assert f"fix data.init_args.test_label_shift: a shift in 1..{classes - 1}" in str(err.value)


def test_real_label_shifts_are_kept():
    for shift in (0, 1, 9, 11, -1):
        assert CIFAR10DataModule(test_label_shift=shift).test_label_shift == shift
    with pytest.raises(ConfigError, match="test_label_shift must be an int, got 1.5"):
        CIFAR10DataModule(test_label_shift=1.5)


# ---------------------------------------------------------------------------------- 4. checks that came late


def test_a_vacuous_linf_eps_is_refused_when_the_adversarial_module_is_built():
    for attack in ("pgd", "fgsm_rs"):
        with pytest.raises(ConfigError, match=r"Linf eps=8 exceeds the width 1.0 of bounds \(0.0, 1.0\).*did you "
                                              r"mean eps=8/255\?; fix model.init_args.eps"):
            AdversarialModule(**TINY, attack=attack, norm="linf", eps=8, step_size=2 / 255)
    with pytest.raises(ConfigError, match="Linf eps=8 exceeds"):  # AttackConfig checks pgd's default bounds now
        AttackConfig("linf", 8, 2 / 255, 7)
    assert AttackConfig("linf", 8, 2 / 255, 7, bounds=None).bounds is None  # unbounded images (squares) may
    with pytest.raises(ConfigError, match="fgsm_alpha must be a positive finite number .* got -0.1; fix "
                                          "model.init_args.fgsm_alpha"):
        AdversarialModule(**TINY, attack="fgsm_rs", norm="linf", eps=8 / 255, fgsm_alpha=-0.1)
    with pytest.raises(ConfigError, match="clean_acc_every must be an int >= 1, got 0"):  # was % 0 at step 1
        AdversarialModule(**TINY, clean_acc_every=0)


def test_cli_refuses_linf_eps_8_and_leaves_no_run_directory(tmp_path):
    run = run_cli("fit", *experiment_configs("adversarial_linf"), "--model.init_args.eps", "8",
                  "--run_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert run.returncode != 0
    assert "Linf eps=8.0 exceeds the width 1.0" in run.stderr and "fix model.init_args.eps" in run.stderr, \
        run.stderr[-3000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_source_lists_the_recipe_cannot_use_are_refused_at_construction(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"sources is empty: relabel_by_attack generates .*fix "
                                          r"data.init_args.sources: list them"):
        ConstructedDataModule([], RelabelByAttack(), cache_dir=str(cache))
    with pytest.raises(ConfigError, match="representation_inversion uses exactly one source checkpoint, got 2.*fix "
                                          "data.init_args.sources"):
        ConstructedDataModule(["a.ckpt", "b.ckpt"], RepresentationInversion(), cache_dir=str(cache))
    with pytest.raises(ConfigError, match="non_transferable_attack needs the target model followed by at least one "
                                          "ensemble member in `sources`, got 1"):
        ConstructedDataModule(["target.ckpt"], NonTransferableAttack(), cache_dir=str(cache))
    for option, value, message in (("generation_batch_size", 0, "generation_batch_size must be an int >= 1, got 0"),
                                   ("shard_size", 0, "shard_size must be an int >= 1, got 0"),
                                   ("source_arch", "resnet", "unknown source_arch 'resnet'")):
        with pytest.raises(ConfigError, match=message):
            ConstructedDataModule(["a.ckpt"], RelabelByAttack(), cache_dir=str(cache), **{option: value})
    assert not cache.exists()


def test_cli_refuses_empty_sources_and_creates_neither_cache_nor_run_directory(tmp_path):
    run = run_cli("fit", *experiment_configs("d_det"), "--data.init_args.sources", "[]",
                  "--data.init_args.cache_dir", str(tmp_path / "cache"), "--run_dir", str(tmp_path / "run"),
                  cwd=tmp_path)
    assert run.returncode != 0
    assert "sources is empty" in run.stderr and "fix data.init_args.sources" in run.stderr, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no cache, no run directory, no runs/
