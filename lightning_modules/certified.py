"""Certified training of a linear classifier (Goh's robust linear features, SPEC 5.1): the loss is the
cross-entropy of the closed-form worst case over the L2 ball (models/linear.py), so no attack runs."""

from __future__ import annotations

import math
import numbers

import torch

from common.errors import ConfigError
from lightning_modules.classifier import ClassifierModule
from models.linear import certified, pixel_weight, worst_case_logits


class CertifiedLinearModule(ClassifierModule):
    """A linear classifier trained on its exact worst case within L2 radius ``eps`` (``train/acc`` is certified
    accuracy on the training batches); validation and test also log ``<split>/certified_acc``."""

    def __init__(self, *args, eps: float = 0.25, **kwargs) -> None:
        """
        Args:
            eps: the L2 radius in [0, 1] pixel units that training certifies (Goh: 0.25).
        """
        super().__init__(*args, **kwargs)
        if self.hparams.arch != "linear":
            raise ConfigError(f"CertifiedLinearModule trains a linear classifier; got arch {self.hparams.arch!r}. "
                              "Set model.init_args.arch: linear (and arch_kwargs: {})")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
            raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}; fix model.init_args.eps")
        self.save_hyperparameters()

    def training_logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return worst_case_logits(self(x), y, pixel_weight(self.model), self.hparams.eps)

    def _evaluate(self, batch, split: str) -> None:
        super()._evaluate(batch, split)
        x, y = batch
        with torch.no_grad():
            held = certified(self(x), y, pixel_weight(self.model), self.hparams.eps).float().mean()
        self.log(f"{split}/certified_acc", held, sync_dist=True)
