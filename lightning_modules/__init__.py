"""The LightningModules that train the networks, plus the callbacks and loggers they use."""

from lightning_modules.adversarial import AdversarialModule
from lightning_modules.callbacks import RecalibrateBatchNorm, RobustAccuracy
from lightning_modules.certified import CertifiedLinearModule
from lightning_modules.classifier import ClassifierModule
from lightning_modules.loggers import WandbLoggerWithFallback
from lightning_modules.squares import SquaresRobustness

__all__ = ["AdversarialModule", "CertifiedLinearModule", "ClassifierModule", "RecalibrateBatchNorm",
           "RobustAccuracy", "SquaresRobustness", "WandbLoggerWithFallback"]
