"""AutoAttack's standard suite (Croce & Hein, 2020) from torchattacks' components, at the original's budgets.

``torchattacks.AutoAttack(version="standard")`` chains APGD-CE, APGD-T, FAB-T and Square, but leaves the first
three at torchattacks' default of 10 iterations (Harry24k/adversarial-attacks-pytorch#196, open); the original
runs each for 100 (Square: 5,000 queries). The same four components, chained the same way (each attacks only
the images the previous ones left standing) with the original's budgets, keep torchattacks' code and the
original's strength.
"""

from __future__ import annotations

import torchattacks
from torch import nn

from common.attack_settings import AUTOATTACK_QUERIES, AUTOATTACK_STEPS


def autoattack_standard(model: nn.Module, eps: float, norm: str = "L2", steps: int = AUTOATTACK_STEPS,
                        queries: int = AUTOATTACK_QUERIES, seed: int = 0, n_classes: int = 10
                        ) -> torchattacks.MultiAttack:
    """AutoAttack "standard" on ``model`` at radius ``eps`` (``norm`` "L2" or "Linf", torchattacks' names): one
    restart of each attack, ``steps`` iterations of the three gradient attacks (APGD-T and FAB-T over the 9 most
    likely wrong classes) and ``queries`` of Square."""
    if steps < 1 or queries < 1:
        raise ValueError(f"AutoAttack needs steps >= 1 and queries >= 1, got {steps} and {queries}")
    shared = {"norm": norm, "eps": eps, "seed": seed, "n_restarts": 1}
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, loss="ce", steps=steps, **shared),
        torchattacks.APGDT(model, steps=steps, n_classes=n_classes, **shared),
        torchattacks.FAB(model, steps=steps, multi_targeted=True, n_classes=n_classes, **shared),
        torchattacks.Square(model, n_queries=queries, **shared),
    ])
