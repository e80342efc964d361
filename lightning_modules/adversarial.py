"""Adversarial training (Madry et al.): train on PGD examples made in eval mode inside ``training_step``;
or, cheaply, on FGSM with a random start (Wong, Rice & Kolter 2020, "Fast is better than free")."""

from __future__ import annotations

import math
import numbers

import torch

from attacks import AttackConfig, check_attack_args, eval_mode, fgsm_rs
from common.errors import ConfigError
from lightning_modules.classifier import ClassifierModule

ATTACKS = ("pgd", "fgsm_rs")
BOUNDS = (0.0, 1.0)  # the pixel box both attacks clamp to (pgd's and fgsm_rs's default bounds), as trained here


class AdversarialModule(ClassifierModule):
    """A classifier trained on adversarial examples of its current weights (``train/acc`` is on them)."""

    def __init__(self, *args, attack: str = "pgd", norm: str = "l2", eps: float = 0.5, step_size: float = 0.1,
                 steps: int = 7, random_start: bool | str = False, use_best: bool = True,
                 fgsm_alpha: float | None = None, clean_acc_every: int = 10, **kwargs) -> None:
        """
        Args:
            attack: ``pgd`` (Madry et al.) or ``fgsm_rs`` (one FGSM step from a uniform random start).
            norm: threat model, ``l2`` or ``linf``.
            eps: radius of the threat model, in [0, 1] pixel units (attacks clamp to that box, so a Linf eps
                wider than it, e.g. 8 for 8/255, is refused here).
            step_size: PGD step (L2 length of each normalised step, or Linf sign-step size).
            steps: PGD steps per training batch.
            random_start: PGD random start: False, True/"ball" (uniform in the ball) or "sphere".
            use_best: PGD returns each example's best-loss iterate (the robustness library's default).
            fgsm_alpha: FGSM step for ``fgsm_rs`` (default 1.25 * eps, as Wong et al.).
            clean_acc_every: measure clean training accuracy (an extra forward pass) every this many batches.
        """
        super().__init__(*args, **kwargs)
        if attack not in ATTACKS:
            raise ConfigError(f"unknown attack {attack!r}; choose one of {ATTACKS}; fix model.init_args.attack")
        # Everything is checked here, with the bounds the attacks will run with: a vacuous Linf eps found at the
        # first training step would leave a run directory (config, hparams) behind.
        check_attack_args(norm, eps, step_size, steps, random_start, BOUNDS, fix="model.init_args")
        if attack == "fgsm_rs":  # one step of fgsm_alpha from a uniform random start
            alpha = 1.25 * eps if fgsm_alpha is None else fgsm_alpha
            if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
                raise ConfigError(f"fgsm_alpha must be a positive finite number (or null for 1.25 * eps), got "
                                  f"{fgsm_alpha!r}; fix model.init_args.fgsm_alpha")
            check_attack_args(norm, eps, alpha, 1, True, BOUNDS, fix="model.init_args")
        if isinstance(clean_acc_every, bool) or not isinstance(clean_acc_every, int) or clean_acc_every < 1:
            raise ConfigError(f"clean_acc_every must be an int >= 1, got {clean_acc_every!r}; fix "
                              "model.init_args.clean_acc_every")
        self.attack = AttackConfig(norm, eps, step_size, steps, random_start, use_best, BOUNDS)
        self.save_hyperparameters()

    def training_inputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        if hp.attack == "fgsm_rs":
            x_adv = fgsm_rs(self.model, x, y, eps=hp.eps, alpha=hp.fgsm_alpha, norm=hp.norm, bounds=BOUNDS,
                            channels_last=hp.channels_last)
        else:
            x_adv = self.attack.run(self.model, x, y, channels_last=hp.channels_last)
        if self.global_step % hp.clean_acc_every == 0:
            with torch.no_grad(), eval_mode(self.model):  # eval mode: leave the BatchNorm statistics alone
                clean_acc = (self(x).argmax(1) == y).float().mean()
            self.log("train/clean_acc", clean_acc, prog_bar=True)
        return x_adv
