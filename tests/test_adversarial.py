"""Adversarial training and accuracy under attack inside the Trainer, on real CIFAR-10 subsets."""

import json

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from common.errors import ConfigError
from datamodules import CIFAR10DataModule
from lightning_modules import AdversarialModule, ClassifierModule, RobustAccuracy, WandbLoggerWithFallback
from lightning_modules.callbacks import parse_points

SMALL = {"arch": "fast_cnn", "arch_kwargs": {"widths": [16, 32, 64]}}


def trainer(tmp_path, **kw):
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, inference_mode=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kw})


@pytest.fixture(scope="module")
def trained_small(tmp_path_factory, data_dir):
    """A small CNN trained 2 epochs on 10,000 real CIFAR-10 images (about 45% test accuracy)."""
    pl.seed_everything(0)
    dm = CIFAR10DataModule(data_dir=str(data_dir), train_size=10000, batch_size=128, eval_batch_size=500)
    model = ClassifierModule(**SMALL, lr=0.1, lr_schedule="linear", warmup_fraction=0.2)
    trainer(tmp_path_factory.mktemp("fit"), max_epochs=2, limit_val_batches=0).fit(model, dm)
    return model, dm


def test_parse_points():
    assert parse_points(["l2:0.25", "linf:8/255", ["L2", 1]]) == [("l2", 0.25), ("linf", 8 / 255), ("l2", 1.0)]


@pytest.mark.parametrize("stage", ["test", "validate"])
def test_attack_inside_test_and_validate_single_process(trained_small, tmp_path, stage):
    model, dm = trained_small
    cb = RobustAccuracy(val_points=["l2:0.25"], test_points=["l2:0", "l2:0.25", "l2:1.0"], val_examples=200,
                        test_examples=200, val_steps=5, test_steps=5)
    t = trainer(tmp_path, callbacks=[cb], limit_val_batches=1, limit_test_batches=1)
    metrics = getattr(t, stage)(model, dm, verbose=False)[0]
    prefix = "test" if stage == "test" else "val"
    clean = metrics["test/robust_acc/l2_0"] if stage == "test" else None
    robust = metrics[f"{prefix}/robust_acc/l2_0.25"]
    assert 0.0 <= robust < 0.35  # a standard model loses much of its ~45% accuracy at L2 eps 0.25
    if stage == "test":
        assert clean > 0.3 and metrics["test/robust_acc/l2_1"] <= robust <= clean - 0.1
        rows = json.loads((tmp_path / "robust_accuracy.json").read_text())["rows"]
        assert rows[1]["robust_acc"] == pytest.approx(robust, abs=1e-6)
        assert (tmp_path / "robust_accuracy.png").stat().st_size > 1000


def test_the_sweep_with_batchnorm_folded_agrees_and_leaves_the_model_as_it_was(trained_small, tmp_path):
    model, dm = trained_small
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = {}
    for fold in (True, False):
        cb = RobustAccuracy(test_points=["l2:0", "l2:0.25"], test_examples=200, test_steps=5, fold_batchnorm=fold)
        trainer(tmp_path / str(fold), callbacks=[cb], limit_test_batches=1).test(model, dm, verbose=False)
        acc[fold] = cb.results
    assert acc[True]["l2_0"] == pytest.approx(acc[False]["l2_0"], abs=0.01)  # the same function, rounded apart
    assert acc[True]["l2_0.25"] == pytest.approx(acc[False]["l2_0.25"], abs=0.03)
    assert acc[True]["l2_0"] > 0.3
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm still there, statistics untouched
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with pytest.raises(ConfigError, match="fold_batchnorm must be true or false"):
        RobustAccuracy(fold_batchnorm="yes")


def test_inference_mode_trainer_gives_a_clear_error(trained_small, tmp_path):
    model, dm = trained_small
    cb = RobustAccuracy(test_points=["l2:0.25"], test_examples=50, test_steps=2)
    t = trainer(tmp_path, callbacks=[cb], inference_mode=True, limit_test_batches=1)
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        t.test(model, dm, verbose=False)


def test_robust_accuracy_reaches_csv_tensorboard_and_offline_wandb(trained_small, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    model, dm = trained_small
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb"),
               WandbLoggerWithFallback(project="bof-test", save_dir=str(tmp_path))]
    cb = RobustAccuracy(test_points=["l2:0", "l2:0.25", "linf:2/255"], test_examples=100, test_steps=3)
    trainer(tmp_path, callbacks=[cb], logger=loggers, limit_test_batches=1).test(model, dm, verbose=False)
    for logger in loggers:
        logger.finalize("success")
    csv = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "test/robust_acc/l2_0.25" in csv and "test/robust_acc/linf_0.0078" in csv
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert "test/robust_acc/l2_0.25" in events.Tags()["scalars"]
    assert "test/robust_accuracy" in events.Tags()["images"]
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_adversarial_training_step_uses_attack_and_keeps_grads_clean(data_dir, tmp_path):
    pl.seed_everything(0)
    dm = CIFAR10DataModule(data_dir=str(data_dir), train_size=512, batch_size=128)
    for attack in ("pgd", "fgsm_rs"):
        model = AdversarialModule(**SMALL, attack=attack, norm="l2", eps=0.5, step_size=0.2, steps=2)
        calls = []
        original = model.training_inputs
        model.training_inputs = lambda x, y, calls=calls, original=original: calls.append(1) or original(x, y)
        # accumulate_grad_batches: an attack that called backward() would leak into the accumulated gradient.
        t = trainer(tmp_path, limit_train_batches=4, limit_val_batches=0, accumulate_grad_batches=2)
        t.fit(model, dm)
        assert len(calls) == 4
        assert {"train/clean_acc", "train/acc", "train/loss"} <= set(t.callback_metrics)
        assert model.training  # the attack restored train mode


def test_attack_leaves_parameter_grads_untouched_and_stays_in_ball():
    """The training attack only takes input gradients (unit-test data: random images)."""
    pl.seed_everything(0)
    model = AdversarialModule(**SMALL, norm="linf", eps=8 / 255, step_size=2 / 255, steps=3)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    x_adv = model.attack.run(model.model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(x_adv, x)


def test_bad_attack_arguments_are_explained():
    with pytest.raises(ValueError, match="unknown attack"):
        AdversarialModule(**SMALL, attack="cw")
    with pytest.raises(ValueError, match="eps"):
        AdversarialModule(**SMALL, eps=-1.0)


def test_autoattack_of_record_is_logged_under_its_own_name(trained_small, tmp_path):
    model, dm = trained_small
    cb = RobustAccuracy(test_points=["l2:0", "l2:0.25"], test_examples=16, test_steps=5,
                        autoattack_points=["l2:0.25"], autoattack_examples=16)
    metrics = trainer(tmp_path, callbacks=[cb], limit_test_batches=1).test(model, dm, verbose=False)[0]
    auto, pgd20 = metrics["test/autoattack_torchattacks/l2_0.25"], metrics["test/robust_acc/l2_0.25"]
    assert 0.0 <= auto <= pgd20 + 0.05  # AutoAttack is at least about as strong as PGD
