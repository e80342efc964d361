"""Adversarial training (Madry et al.): train on PGD examples made in eval mode inside ``training_step``;
or, cheaply, on FGSM with a random start (Wong, Rice & Kolter 2020, "Fast is better than free")."""

from __future__ import annotations

import torch

from attacks import AttackConfig, eval_mode, fgsm_rs
from lightning_modules.classifier import ClassifierModule

ATTACKS = ("pgd", "fgsm_rs")


class AdversarialModule(ClassifierModule):
    """A classifier trained on adversarial examples of its current weights (``train/acc`` is on them)."""

    def __init__(self, *args, attack: str = "pgd", norm: str = "l2", eps: float = 0.5, step_size: float = 0.1,
                 steps: int = 7, random_start: bool | str = False, use_best: bool = True,
                 fgsm_alpha: float | None = None, clean_acc_every: int = 10, **kwargs) -> None:
        """
        Args:
            attack: ``pgd`` (Madry et al.) or ``fgsm_rs`` (one FGSM step from a uniform random start).
            norm: threat model, ``l2`` or ``linf``.
            eps: radius of the threat model, in [0, 1] pixel units.
            step_size: PGD step (L2 length of each normalised step, or Linf sign-step size).
            steps: PGD steps per training batch.
            random_start: PGD random start: False, True/"ball" (uniform in the ball) or "sphere".
            use_best: PGD returns each example's best-loss iterate (the robustness library's default).
            fgsm_alpha: FGSM step for ``fgsm_rs`` (default 1.25 * eps, as Wong et al.).
            clean_acc_every: measure clean training accuracy (an extra forward pass) every this many batches.
        """
        super().__init__(*args, **kwargs)
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose one of {ATTACKS}")
        self.attack = AttackConfig(norm, eps, step_size, steps, random_start, use_best)  # validates them
        self.save_hyperparameters()

    def training_inputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        if hp.attack == "fgsm_rs":
            x_adv = fgsm_rs(self.model, x, y, eps=hp.eps, alpha=hp.fgsm_alpha, norm=hp.norm,
                            channels_last=hp.channels_last)
        else:
            x_adv = self.attack.run(self.model, x, y, channels_last=hp.channels_last)
        if self.global_step % hp.clean_acc_every == 0:
            with torch.no_grad(), eval_mode(self.model):  # eval mode: leave the BatchNorm statistics alone
                clean_acc = (self(x).argmax(1) == y).float().mean()
            self.log("train/clean_acc", clean_acc, prog_bar=True)
        return x_adv
