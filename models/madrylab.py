"""Import a checkpoint of the MadryLab ``robustness`` library (``cifar_nat.pt``, ``cifar_l2_0_5.pt``, ...) as a
suite checkpoint, without running pickle code and without dill:

    python -m models.madrylab cifar_l2_0_5.pt runs/imported/cifar_l2_0_5.ckpt

The library saves ``{"model": state_dict, "optimizer": ..., "schedule": ..., "epoch": ...}`` with
``torch.save(..., pickle_module=dill)``; for tensors and plain containers dill writes what pickle writes, so
torch's restricted unpickler (``weights_only=True``) reads them. Only numpy's scalar reconstruction is added to
what it allows (the library stores some numbers as numpy scalars); any other object is refused, naming it,
before anything of it runs. The state dict's keys carry ``module.`` (DataParallel), ``model.`` (the network;
``attacker.model.`` is the same network again) and ``normalizer.`` (the input normalisation, whose mean and std
must be CIFAR-10's: the suite's networks normalise inside, with the same constants). The library's CIFAR
ResNet-50 (conv1, bn1, layer1-4 of Bottlenecks conv1/bn1/conv2/bn2/conv3/bn3/shortcut, linear) is mapped, in
that order and shape by shape, onto the suite's (models/networks.py), which has the same layers in the same
order under other names. The result is a Lightning-style checkpoint (``hyper_parameters`` + ``state_dict``) that
every stage taking a source model reads, with ``imported_from`` recording the source file's sha256.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import zipfile
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from common.datasets import CIFAR10_MEAN as CIFAR_MEAN
from common.datasets import CIFAR10_STD as CIFAR_STD
from common.files import file_hash, temporary_name
from models.checkpoints import CheckpointError, _first_line
from models.networks import build_model

NETWORK_PREFIX, NORMALIZER_PREFIX = "module.model.", "module.normalizer."
BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet18": (2, 2, 2, 2)}  # the library's CIFAR ResNets
BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def library_keys(arch: str = "resnet50") -> list[str]:
    """The library's state-dict keys of its CIFAR ResNet, in registration order (its cifar_models/resnet.py)."""
    def conv_bn(conv: str, bn: str) -> list[str]:
        return [f"{conv}.weight", *(f"{bn}.{f}" for f in BN_FIELDS)]

    bottleneck = arch == "resnet50"
    keys = conv_bn("conv1", "bn1")
    c_in = 64
    for layer, (width, depth) in enumerate(zip((64, 128, 256, 512), BLOCKS[arch], strict=True), start=1):
        for b in range(depth):
            stride = 2 if layer > 1 and b == 0 else 1
            block = f"layer{layer}.{b}"
            convs = (1, 2, 3) if bottleneck else (1, 2)
            for i in convs:
                keys += conv_bn(f"{block}.conv{i}", f"{block}.bn{i}")
            c_out = width * (4 if bottleneck else 1)
            if stride != 1 or c_in != c_out:
                keys += conv_bn(f"{block}.shortcut.0", f"{block}.shortcut.1")
            c_in = c_out
    return [*keys, "linear.weight", "linear.bias"]


def read_library_checkpoint(path: Path, *, need_model: bool = True) -> dict:
    """The file's dict, read with torch's restricted unpickler (plus numpy scalars); CheckpointError otherwise
    (and, with ``need_model``, when it has no ``model`` state dict)."""
    safe = [np.dtype, type(np.dtype("float64")), type(np.dtype("int64")), type(np.dtype("float32"))]
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar  # numpy 2 and 1
    try:
        with torch.serialization.safe_globals([scalar, *safe]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing {path}: it holds objects other than tensors, numbers and plain containers, which only "
            f"arbitrary unpickling could build (code hidden in the file could run; nothing of it was run). "
            f"({_first_line(err)})") from err
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged or truncated (torch could not read it: {_first_line(err)}). "
                              "Download it again") from err
    if not isinstance(loaded, Mapping) or (need_model and not isinstance(loaded.get("model"), Mapping)):
        found = sorted(map(str, loaded))[:8] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise CheckpointError(f"{path} is not a robustness-library checkpoint: it needs a 'model' state dict "
                              f"(found {found})")
    return dict(loaded)


def library_arch(loaded: Mapping, source: Path) -> str:
    """The CIFAR ResNet (``BLOCKS``) whose keys the file's network has; CheckpointError if none."""
    weights = {k[len(NETWORK_PREFIX):] for k in loaded["model"] if k.startswith(NETWORK_PREFIX)}
    for arch in BLOCKS:
        if weights == set(library_keys(arch)):
            return arch
    nearest = min(BLOCKS, key=lambda a: len(weights ^ set(library_keys(a))))
    missing, extra = sorted(set(library_keys(nearest)) - weights), sorted(weights - set(library_keys(nearest)))
    raise CheckpointError(
        f"{source} is not one of the library's CIFAR ResNets ({', '.join(BLOCKS)}): against its {nearest}, "
        f"{len(missing)} keys are missing (e.g. {missing[:3]}) and {len(extra)} are extra (e.g. {extra[:3]})")


def suite_checkpoint(loaded: Mapping, source: Path, arch: str | None = None) -> dict:
    """The suite checkpoint (Lightning format) of the library checkpoint ``loaded`` read from ``source``.
    ``arch``: the architecture to expect (None: the one its keys name)."""
    found = library_arch(loaded, source)
    if arch is not None and found != arch:
        raise CheckpointError(f"{source} holds the library's CIFAR {found}, not the {arch} asked for: pass --arch "
                              f"{found}, or the file of a {arch}")
    state = loaded["model"]
    weights = {k[len(NETWORK_PREFIX):]: v for k, v in state.items() if k.startswith(NETWORK_PREFIX)}
    for name, want in (("new_mean", CIFAR_MEAN), ("new_std", CIFAR_STD)):
        have = state.get(NORMALIZER_PREFIX + name)
        if have is None or not torch.allclose(have.flatten().float(), torch.tensor(want), atol=1e-4):
            raise CheckpointError(f"{source}: its input normalisation {name} is "
                                  f"{None if have is None else have.flatten().tolist()}, not CIFAR-10's {list(want)}"
                                  ": the suite's network would see other inputs than the one that was trained")
    expected = library_keys(found)
    model = build_model(found)
    ours = model.state_dict()
    targets = [k for k in ours if not k.startswith("normalize.")]
    if len(targets) != len(expected):
        raise CheckpointError(f"internal: the suite's {found} has {len(targets)} tensors, the library's "
                              f"{len(expected)}")
    mapped = {}
    for theirs, mine in zip(expected, targets, strict=True):
        tensor = weights[theirs]
        if tuple(tensor.shape) != tuple(ours[mine].shape):
            raise CheckpointError(f"{source}: {theirs} has shape {tuple(tensor.shape)} where the suite's {found} "
                                  f"({mine}) needs {tuple(ours[mine].shape)}")
        mapped[mine] = tensor.to(ours[mine].dtype)
    model.load_state_dict({**{k: v for k, v in ours.items() if k.startswith("normalize.")}, **mapped})
    epoch = loaded.get("epoch")
    return {
        # Lightning's `test --ckpt_path` reads the version to migrate old checkpoints; ours needs no migration
        "pytorch-lightning_version": version("pytorch-lightning"),
        "hyper_parameters": {"arch": found, "num_classes": 10, "in_channels": 3, "mean": list(CIFAR_MEAN),
                             "std": list(CIFAR_STD), "arch_kwargs": {}},
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "imported_from": {"library": "robustness", "file": source.name, "sha256": file_hash(source, "sha256"),
                          "epoch": int(epoch) if isinstance(epoch, int | np.integer) else None},
    }


def import_checkpoint(source: str | Path, out: str | Path, arch: str | None = None) -> Path:
    """Write the suite checkpoint of the library checkpoint ``source`` to ``out``; returns ``out``."""
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise CheckpointError(f"{source} not found: pass the path of a robustness-library .pt file")
    checkpoint = suite_checkpoint(read_library_checkpoint(source), source, arch)
    save_atomic(checkpoint, out)
    return out


def save_atomic(checkpoint: dict, out: Path) -> None:
    """``torch.save`` under a temporary name, then renamed: never a half-written checkpoint under ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(out)
    try:
        torch.save(checkpoint, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.madrylab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="the robustness-library checkpoint (.pt)")
    p.add_argument("out", help="the suite checkpoint to write (.ckpt)")
    p.add_argument("--arch", default=None, choices=sorted(BLOCKS),
                   help="the architecture to expect (default: the one the file's keys name)")
    args = p.parse_args(argv)
    try:
        written = import_checkpoint(args.source, args.out, args.arch)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    record = torch.load(written, map_location="cpu", weights_only=True)["imported_from"]
    print(f"imported {args.source} (sha256 {record['sha256']}) -> {written}")


if __name__ == "__main__":
    main()
