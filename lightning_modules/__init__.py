"""Models and the LightningModules that train them, plus the callbacks and loggers they use."""

from lightning_modules.adversarial import AdversarialModule
from lightning_modules.callbacks import RobustAccuracy
from lightning_modules.classifier import ClassifierModule
from lightning_modules.loggers import WandbLoggerWithFallback

__all__ = ["AdversarialModule", "ClassifierModule", "RobustAccuracy", "WandbLoggerWithFallback"]
