"""Reading Lightning checkpoints of the suite without running anything they contain.

A checkpoint is a pickle, and unpickling can run code. Every checkpoint is read here with ``weights_only=True``
(tensors and plain containers only), from a local path or a URL (:func:`read_checkpoint`), and checked: that it
is a checkpoint at all, that the LightningModule class it names is an allowed one (LightningCLI would import
whatever ``hyper_parameters["_class_path"]`` names), and that it holds the network the config describes
(LightningCLI would otherwise swap in the checkpoint's model without a word). :func:`load_source` rebuilds the
network of a checkpoint for attacks and dataset generation.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import ConfigError
from common.files import file_hash
from models.networks import build_model

# What a checkpoint's hyperparameters must agree on with the config: these build the network. The rest
# (optimiser, schedule, attack settings) only say how it was trained and may differ.
NETWORK_KEYS = ("arch", "num_classes", "in_channels", "arch_kwargs")
# ``ckpt_path`` values that Lightning resolves itself to a checkpoint it wrote (and loads with weights_only).
LIGHTNING_SPECIAL_PATHS = ("last", "best", "hpc")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: unreadable, unsafe, of a class not in the suite, or of another network."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the path given."""


def is_url(path: str) -> bool:
    return "://" in path


def read_checkpoint(path: str) -> dict:
    """The checkpoint at ``path`` (a local file, or an ``http(s)://`` or other fsspec URL), loaded with
    ``weights_only=True`` on the CPU. Raises :class:`CheckpointError` naming the file and what is wrong."""
    try:
        if path.startswith(("http://", "https://")):
            # torch.hub caches the download, so Lightning's own (also weights_only) load reuses the file
            checkpoint = torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True,
                                                            progress=False)
        elif is_url(path):
            from lightning_fabric.utilities.cloud_io import _load

            checkpoint = _load(path, map_location="cpu", weights_only=True)
        else:
            local = Path(path)
            if not local.exists():
                raise CheckpointNotFoundError(f"checkpoint {path} not found (resolved: {local.resolve()}). Check "
                                              "--ckpt_path; a fit writes its checkpoints to RUN_DIR/checkpoints "
                                              "(last.ckpt)")
            if not local.is_file():
                raise CheckpointError(f"checkpoint {path} is not a file. Pass a .ckpt file such as "
                                      f"{local / 'checkpoints' / 'last.ckpt'}")
            checkpoint = torch.load(local, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it is not loadable with weights_only=True (it holds objects "
            f"other than tensors and plain containers, which would need arbitrary unpickling: code hidden in the "
            f"file could run). Only use checkpoints written by this suite or by Lightning. ({_first_line(err)})"
        ) from err
    except (RuntimeError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated (torch could not read it: "
                              f"{_first_line(err)}). Copy or download it again, or train it again") from err
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    except Exception as err:  # a text file, another format: torch's errors say nothing about the file
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)}). "
                              "Pass a .ckpt file written by `train.py fit`") from err
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{path} is not a Lightning checkpoint: it needs a 'state_dict' (found {found}). Pass "
                              "a .ckpt file written by `train.py fit`")
    return dict(checkpoint)


def check_class_path(checkpoint: Mapping, path: str, allowed: Mapping[str, type]) -> str | None:
    """The LightningModule class path the checkpoint names (None if it names none). Refuses any class not in
    ``allowed`` (class path -> class): LightningCLI would import its module, and importing runs code."""
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path") if isinstance(hparams, Mapping) else None
    if class_path is None:
        return None
    if class_path not in allowed:
        raise CheckpointError(
            f"refusing checkpoint {path}: its hyper_parameters name the class {class_path!r}, which is not one of "
            f"the suite's LightningModules ({', '.join(sorted(n for n in allowed if n.count('.') == 1))}); "
            "importing it could run code. Use a checkpoint written by this suite's `train.py fit`"
        )
    return class_path


def check_network(checkpoint: Mapping, path: str, model_config: Mapping[str, Any]) -> list[str]:
    """Refuse a checkpoint whose network (``NETWORK_KEYS``) differs from the one ``model_config`` (the config's
    ``model.init_args``) builds; the other hyperparameters that differ, as ``key=checkpoint (config: value)``."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping):
        hparams = {}
    if "arch" in model_config and "arch" not in hparams:
        raise CheckpointError(f"checkpoint {path} records no network (no 'arch' in its hyper_parameters), so it "
                              "cannot be checked against the config's model. Use a checkpoint written by `train.py "
                              "fit` (robustness-library checkpoints must be converted first)")
    mismatches, others = [], []
    for key in sorted(set(hparams) & set(model_config)):
        if key.startswith("_"):
            continue
        have, want = _plain(hparams[key]), _plain(model_config[key])
        if key == "arch_kwargs":
            have, want = have or {}, want or {}
        if have != want:
            (mismatches if key in NETWORK_KEYS else others).append(f"{key}={have!r} (config: {want!r})")
    if mismatches:
        raise CheckpointError(
            f"checkpoint {path} holds another network than the config builds: {'; '.join(mismatches)}. Pass the "
            "config the checkpoint was trained with (its run directory holds it as config.yaml), or a checkpoint "
            "of this config's model"
        )
    return others


def _plain(value: Any) -> Any:
    """Lists for tuples and dicts for Namespaces, so a config value and a checkpoint value compare equal."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ------------------------------------------------------------------ source models for attacks and generation

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
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"source checkpoint {path} not found (resolved: {path.resolve()}). Train the source model first "
            "(e.g. `python train.py fit --config configs/mini/base.yaml --config configs/mini/standard.yaml`) "
            "and point `sources` at its "
            "last.ckpt."
        )
    checkpoint = read_checkpoint(str(path))
    hparams = checkpoint.get("hyper_parameters") or {}
    if "arch" not in hparams:
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
                         f"({build}); was it trained with another version of models/networks.py?\n{err}") from err
    model.eval().requires_grad_(False)  # attacks need input gradients only
    return Source(str(path), file_hash(path, "sha256"), build, model)
