"""Adversarial attacks: one PGD engine (L2 / Linf, targeted or not, custom losses), its evaluation, model
ensembles with Nakkiran's non-transferable loss, and the flip measurement on the adversarial-squares data."""

from attacks.ensemble import (
    BatchedEnsemble,
    Ensemble,
    LoopEnsemble,
    architecture_mismatch,
    make_ensemble,
    nakkiran_loss,
    transfer_report,
)
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
from attacks.squares import PixelMeanClassifier, attack_squares, flipped_by_attack, linear_radius

__all__ = [
    "NORMS",
    "AttackConfig",
    "BatchedEnsemble",
    "Ensemble",
    "LoopEnsemble",
    "PixelMeanClassifier",
    "architecture_mismatch",
    "attack_squares",
    "attack_success_rate",
    "check_attack_args",
    "cross_entropy_loss",
    "eval_mode",
    "fgsm_rs",
    "flipped_by_attack",
    "linear_radius",
    "make_ensemble",
    "nakkiran_loss",
    "pgd",
    "point_key",
    "predict",
    "random_delta",
    "robust_accuracy",
    "targeted_transfer_rate",
    "transfer_report",
]
