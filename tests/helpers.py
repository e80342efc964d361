"""Helpers shared by the test files (tests/ is on sys.path under pytest): small checkpoints, synthetic
constructed data, released-dataset files, and small real-data networks."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from datamodules import ConstructedDataModule
from models import build_model

# The hyperparameters of a tiny ClassifierModule network (fast CNN 8/16/32).
TINY = {"arch": "fast_cnn", "num_classes": 10, "in_channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "arch_kwargs": {"widths": [8, 16, 32]}}
N = 64  # synthetic training images


def with_bn_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm running statistics far from their initial (0, 1), then freeze in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
    return model.eval().requires_grad_(False)


def write_checkpoint(path: Path, seed: int = 0, nan: bool = False, bn_statistics: bool = False, **hparams) -> Path:
    """A checkpoint as Lightning writes it for ClassifierModule (hyperparameters + ``model.``-prefixed weights);
    ``bn_statistics``: BatchNorm running statistics far from their initial values (so that folding them matters)."""
    hp = {**TINY, **hparams}
    torch.manual_seed(seed)
    model = build_model(hp["arch"], hp["num_classes"], hp["in_channels"], hp["mean"], hp["std"], **hp["arch_kwargs"])
    if bn_statistics:
        model = with_bn_statistics(model, seed)
    if nan:
        model.head.bias.data[3] = float("nan")
    torch.save({"hyper_parameters": hp, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


class Synthetic(ConstructedDataModule):
    """``n_train`` random 16x16 training images (and ``n_test`` test images): unit-test data only."""

    n_train, n_test = N, 20

    def load(self):
        gen = torch.Generator().manual_seed(0)
        n = self.n_train
        x = torch.randint(0, 256, (n + self.n_test, 3, 16, 16), dtype=torch.uint8, generator=gen)
        y = torch.arange(n + self.n_test) % 10
        return x[:n], y[:n], x[n:], y[n:]


class Payload:
    """Unpickling this object would create ``marker``: what a malicious file could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def save_released(folder: Path, n_parts: int = 3, legacy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Files as the authors released them: torch.save'd lists of tensors (``legacy``: pre-1.6 torch format)."""
    folder.mkdir(parents=True)
    x = torch.rand(12, 3, 32, 32)
    y = torch.arange(12) % 10
    torch.save(list(x.chunk(n_parts)), folder / "CIFAR_ims", _use_new_zipfile_serialization=not legacy)
    torch.save(list(y.chunk(n_parts)), folder / "CIFAR_lab", _use_new_zipfile_serialization=not legacy)
    return x, y


def train_tiny(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int = 2) -> nn.Module:
    """A small fast CNN trained briefly on real CIFAR-10 (plain loop: seconds)."""
    torch.manual_seed(seed)
    model = build_model("fast_cnn", widths=(8, 16, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(100):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


def parsed_config(argv: list[str]) -> dict:
    """The config a ``train.py`` command (``["fit", "--config", ...]``) resolves to (the CLI's own parse)."""
    from lightning_modules.cli import resolved_config

    return resolved_config(argv)


def class_names(components: list[dict] | None) -> list[str]:
    """``["ModelCheckpoint", ...]``: the class names of a parsed list of callbacks or loggers."""
    return [c["class_path"].rsplit(".", 1)[-1] for c in components or []]


REPO = Path(__file__).resolve().parents[1]


def environment(data_dir: Path) -> dict[str, str]:
    """The environment of a subprocess run of the suite in a test: real data, one thread, wandb offline."""
    return {**os.environ, "BOF_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "MPLBACKEND": "Agg", "PYTHONPATH": str(REPO)}


def experiment_configs(experiment: str, scale: str = "mini") -> list[str]:
    """``--config`` arguments of an experiment's one-line form: its scale's base file, then its own."""
    folder = REPO / "configs" / scale
    return ["--config", str(folder / "base.yaml"), "--config", str(folder / f"{experiment}.yaml")]
