"""Models and the LightningModules that train them."""

from lightning_modules.classifier import ClassifierModule
from lightning_modules.models import ARCHITECTURES, build_model

__all__ = ["ARCHITECTURES", "ClassifierModule", "build_model"]
