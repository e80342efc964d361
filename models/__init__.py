"""The networks of the suite and their checkpoints, below both the data and the LightningModules: datamodules
build source models from checkpoints, LightningModules train them, and neither imports the other."""

from models.checkpoints import CheckpointError, Source, load_source, read_checkpoint
from models.networks import ARCHITECTURES, Classifier, PatchWhitening, arch_kwargs_of, build_model

__all__ = ["ARCHITECTURES", "CheckpointError", "Classifier", "PatchWhitening", "Source", "arch_kwargs_of",
           "build_model", "load_source", "read_checkpoint"]
