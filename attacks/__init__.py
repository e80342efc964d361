"""Adversarial attacks: one PGD engine (L2 / Linf, targeted or not, custom losses) and its evaluation."""

from attacks.evaluate import (
    attack_success_rate,
    point_key,
    predict,
    robust_accuracy,
    targeted_transfer_rate,
)
from attacks.pgd import (
    NORMS,
    AttackConfig,
    check_attack_args,
    cross_entropy_loss,
    eval_mode,
    fgsm_rs,
    pgd,
    random_delta,
)

__all__ = [
    "NORMS",
    "AttackConfig",
    "attack_success_rate",
    "check_attack_args",
    "cross_entropy_loss",
    "eval_mode",
    "fgsm_rs",
    "pgd",
    "point_key",
    "predict",
    "random_delta",
    "robust_accuracy",
    "targeted_transfer_rate",
]
