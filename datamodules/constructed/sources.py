"""Source models of the constructed datasets: Lightning checkpoints of ``ClassifierModule`` /
``AdversarialModule``, loaded without arbitrary unpickling and identified by the sha256 of their bytes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError
from datamodules.files import file_hash

MODEL_PREFIX = "model."  # ClassifierModule keeps its network in ``self.model``
BUILD_KEYS = ("arch", "num_classes", "in_channels", "mean", "std", "arch_kwargs")


@dataclass
class Source:
    """A source model ready for generation (eval mode, no parameter gradients)."""

    path: str
    sha256: str
    hparams: dict  # the network's build arguments, from the checkpoint
    model: nn.Module

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, **self.hparams}


def load_source(path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
                in_channels: int | None = None) -> Source:
    """Rebuild the network of a Lightning checkpoint; ``arch`` / ``num_classes`` / ``in_channels`` are
    checked against the checkpoint when given."""
    from lightning_modules.models import build_model  # lightning_modules imports datamodules: import late

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"source checkpoint {path} not found (resolved: {path.resolve()}). Train the source model first "
            "(e.g. `python train.py fit --config configs/mini/standard.yaml`) and point `sources` at its "
            "last.ckpt."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in several types; all mean "not a plain checkpoint"
        raise ConfigError(f"{path} is not a checkpoint loadable with weights_only=True (no arbitrary "
                         f"unpickling): {err}") from err
    hparams = checkpoint.get("hyper_parameters") or {}
    if "arch" not in hparams or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a ClassifierModule/AdversarialModule checkpoint: it needs "
                         "'hyper_parameters' with 'arch' and a 'state_dict' (robustness-library checkpoints "
                         "must be converted first)")
    build = {k: hparams[k] for k in BUILD_KEYS if hparams.get(k) is not None}
    expected = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels}
    for key, want in expected.items():
        have = build.get(key, {"num_classes": 10, "in_channels": 3}.get(key))  # build_model's defaults
        if want is not None and have != want:
            raise ConfigError(f"source checkpoint {path} has {key}={have!r}, but the config expects {want!r}")
    model = build_model(**{k: v for k, v in build.items() if k != "arch_kwargs"}, **build.get("arch_kwargs", {}))
    weights = {k[len(MODEL_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(f"the weights in {path} do not fit the network its hyperparameters describe "
                         f"({build}); was it trained with another version of models.py?\n{err}") from err
    model.eval().requires_grad_(False)  # attacks need input gradients only
    return Source(str(path), file_hash(path, "sha256"), build, model)
