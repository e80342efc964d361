"""Standard training: a classifier from ``models.py`` trained with cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from common.datasets import CIFAR10_MEAN as CIFAR_MEAN
from common.datasets import CIFAR10_STD as CIFAR_STD
from common.datasets import MNIST_MEAN, MNIST_STD
from common.errors import ConfigError, UserError
from common.tensors import as_float_images
from models import build_model

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "linear", "constant")
# The datamodule splits each trainer stage reads (``check_data``); other stages check every split there is.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}
# Normalisation statistics to suggest in a channel-mismatch message, by channel count.
EXAMPLE_STATS = {1: f"mean: {list(MNIST_MEAN)}, std: {list(MNIST_STD)} for MNIST",
                 3: f"mean: {list(CIFAR_MEAN)}, std: {list(CIFAR_STD)} for CIFAR-10"}


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN / inf; the message names the batch and the usual fixes."""


class ClassifierModule(pl.LightningModule):
    """A classifier trained with (label-smoothed) cross-entropy: the standard models of the papers."""

    def __init__(
        self,
        arch: str = "fast_cnn",
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] = CIFAR_MEAN,
        std: Sequence[float] = CIFAR_STD,
        arch_kwargs: dict | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        lr_schedule: str = "step",
        lr_milestones: Sequence[int] = (50, 100),
        lr_gamma: float = 0.1,
        warmup_fraction: float = 0.0,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
    ) -> None:
        """
        Args:
            arch: network: ``resnet18``, ``resnet50``, ``vgg16``, ``fast_cnn``, ``simple_cnn`` or ``linear`` (see
                ``models/networks.py``).
            num_classes: number of output classes; must equal the datamodule's ``num_classes``.
            in_channels: image channels (3 for CIFAR-10, 1 for MNIST); must match the data's. Both are checked
                against the data when the trainer sets the module up (:meth:`check_data`).
            mean: per-channel mean of the normalisation layer inside the model (inputs stay in pixel units).
            std: per-channel std of the normalisation layer.
            arch_kwargs: extra architecture arguments, e.g. ``{"widths": [32, 64, 128]}`` for ``fast_cnn``; keys
                the architecture does not take (``models.arch_kwargs_of``) are refused.
            optimizer: ``sgd`` (momentum, optional Nesterov) or ``adam``. A LightningCLI ``--optimizer``
                section overrides this and the schedule.
            lr: peak learning rate.
            momentum: SGD momentum.
            nesterov: Nesterov momentum for SGD.
            weight_decay: L2 weight decay.
            lr_schedule: ``step`` (divide by ``1/lr_gamma`` at each epoch of ``lr_milestones``, the robustness
                library's schedule), ``linear`` (per-step linear warm-up over ``warmup_fraction`` of training,
                then linear decay to 0) or ``constant``.
            lr_milestones: epochs of the ``step`` schedule.
            lr_gamma: factor of the ``step`` schedule.
            warmup_fraction: fraction of all steps spent warming up in the ``linear`` schedule.
            label_smoothing: label smoothing of the training loss (evaluation uses plain cross-entropy).
            channels_last: keep weights and inputs in channels_last memory format.
        """
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
        if lr_schedule not in SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {lr_schedule!r}; choose one of {SCHEDULES}")
        checks = {"lr": (lr, lr > 0, "> 0"), "weight_decay": (weight_decay, weight_decay >= 0, ">= 0"),
                  "momentum": (momentum, 0 <= momentum < 1, "in [0, 1)"), "lr_gamma": (lr_gamma, lr_gamma > 0, "> 0"),
                  "label_smoothing": (label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)"),
                  "warmup_fraction": (warmup_fraction, 0 <= warmup_fraction < 1, "in [0, 1)")}
        for name, (value, ok, allowed) in checks.items():
            if not ok:  # NaN fails every comparison, so it lands here too
                raise ConfigError(f"{name} must be {allowed}, got {value!r}; fix model.init_args.{name}")
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes, in_channels, mean, std, **(arch_kwargs or {}))
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.metrics = torch.nn.ModuleDict(
            {split: MulticlassAccuracy(num_classes, average="micro") for split in ("train_", "val_", "test_")}
        )

    def setup(self, stage: str) -> None:
        # Lightning runs this after the datamodule's setup: the data is there to compare with the network, which
        # would otherwise broadcast 1-channel images against 3-channel statistics and train without a word.
        datamodule = self.trainer.datamodule
        if datamodule is not None:
            self.check_data(datamodule, stage)

    def check_data(self, datamodule: pl.LightningDataModule, stage: str | None = None) -> None:
        """Refuse data the network was not built for: a ``num_classes`` other than the model's, images with
        another channel count than its ``in_channels``, labels outside ``[0, num_classes)``. Checks the splits
        that ``stage`` reads (``STAGE_SPLITS``) among ``datamodule.train`` / ``val`` / ``test`` ((x, y) tensors);
        splits not set up yet, and datamodules without them, are skipped."""
        in_channels, num_classes = self.model.normalize.mean.shape[1], self.model.head.out_features
        name = type(datamodule).__name__
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != num_classes:
            raise ConfigError(f"{name} has {data_classes} classes but the model was built with num_classes="
                              f"{num_classes}; fix model.init_args.num_classes: {data_classes}")
        for split in STAGE_SPLITS.get(stage, ("train", "val", "test")):
            data = getattr(datamodule, split, None)
            if not (isinstance(data, tuple | list) and len(data) == 2
                    and all(isinstance(t, torch.Tensor) for t in data)):
                continue
            x, y = data
            if x.dim() == 4 and x.shape[1] != in_channels:
                c = x.shape[1]
                stats = f" (e.g. {EXAMPLE_STATS[c]})" if c in EXAMPLE_STATS else ""
                raise ConfigError(
                    f"{name} {split} images have {c} channel(s) (shape {list(x.shape[1:])}) but the model was "
                    f"built with in_channels={in_channels}; fix model.init_args.in_channels: {c}, with {c}-value "
                    f"model.init_args.mean and std{stats}"
                )
            if len(y) and not y.is_floating_point():
                low, high = (int(v) for v in torch.aminmax(y))
                if low < 0 or high >= num_classes:
                    raise ConfigError(f"{name} {split} labels lie in [{low}, {high}], outside the model's "
                                      f"[0, {num_classes}) (num_classes={num_classes}); fix "
                                      f"model.init_args.num_classes or the labels of the data")

    def on_fit_start(self) -> None:
        # Data-initialised layers (fast_cnn's whitening) are fitted once, from the first 5,000 training images;
        # a resumed run loads them from the checkpoint instead.
        datamodule = self.trainer.datamodule
        train = getattr(datamodule, "train", None)
        if train is not None:
            self.model.fit_whitening(as_float_images(train[0][:5000]).to(self.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_inputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The inputs the model is trained on; adversarial training overrides this."""
        return x

    def training_logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The logits the training loss and ``train/acc`` see; certified training overrides this."""
        return self(self.training_inputs(x, y))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.training_logits(x, y)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        if not torch.isfinite(loss):  # one check of a scalar; stop before the update spreads NaN to the weights
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, batch {batch_idx} "
                f"(global step {self.global_step}); training stopped before this update. Usual causes: a learning "
                "rate too high for the schedule, NaN/inf in the inputs, fp16 overflow. Fix: lower model.init_args.lr "
                "(or add warm-up), check the data, use precision 32-true or bf16-mixed, or set "
                "trainer.gradient_clip_val; resume from the last good checkpoint with --ckpt_path"
            )
        self.metrics["train_"](logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.metrics["train_"], prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def _evaluate(self, batch, split: str) -> None:
        x, y = batch
        logits = self(x)
        self.metrics[split + "_"](logits, y)
        self.log(f"{split}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{split}/acc", self.metrics[split + "_"], prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":  # weight decay on every parameter, as the robustness library does
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                                  weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.lr_schedule == "constant":
            return opt
        if hp.lr_schedule == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(hp.lr_milestones), hp.lr_gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(hp.warmup_fraction * total))

        def linear(step: int) -> float:
            return min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
