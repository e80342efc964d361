"""A model from outside a reproduction as one of its stages (``reproduce --use STAGE=FILE``):

    python -m models.imported FILE OUT.ckpt --record OUT.json

``FILE`` is a checkpoint of the MadryLab ``robustness`` library (converted by :mod:`models.madrylab`) or a
suite checkpoint (``train.py fit``'s ``last.ckpt``, e.g. from another machine), read without running pickle
code either way. ``OUT.ckpt`` is a suite checkpoint that ``train.py test`` and every stage taking a source model
read; ``OUT.json`` records where it came from (path, format, sha256 of the file, network) for the report.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

import torch

from common.files import file_hash, write_json_atomic
from models.checkpoints import NETWORK_KEYS, CheckpointError, load_source
from models.madrylab import read_library_checkpoint, save_atomic, suite_checkpoint

SUITE, LIBRARY = "suite", "robustness"


def _read(path: Path) -> tuple[str, dict]:
    """``(format, checkpoint in the suite's format)`` of ``path``; CheckpointError if it is neither."""
    if not path.is_file():
        raise CheckpointError(f"imported model {path} not found (resolved: {path.resolve()}): pass the path of a "
                              "robustness-library .pt file or of a suite .ckpt")
    loaded = read_library_checkpoint(path, need_model=False)  # tensors, numbers and plain containers only
    if "state_dict" in loaded:  # written by train.py fit (or by this module)
        checkpoint = loaded
        if "arch" not in (checkpoint.get("hyper_parameters") or {}):
            raise CheckpointError(f"{path} records no network (no 'arch' in its hyper_parameters): pass a "
                                  "checkpoint written by `train.py fit`, or a robustness-library file")
        # Written by hand (weights + hyperparameters only)? Lightning's `test --ckpt_path` needs the version.
        checkpoint.setdefault("pytorch-lightning_version", version("pytorch-lightning"))
        return SUITE, checkpoint
    if isinstance(loaded.get("model"), Mapping):
        return LIBRARY, suite_checkpoint(loaded, path)
    raise CheckpointError(f"{path} is neither a suite checkpoint ('state_dict') nor a robustness-library one "
                          f"('model'): found {sorted(map(str, loaded))[:8]}")


@functools.cache
def _network(path: Path, mtime_ns: int, size: int) -> dict:
    _, checkpoint = _read(path)
    hparams = checkpoint["hyper_parameters"]
    return {k: hparams.get(k) for k in NETWORK_KEYS}


def network_of(path: str | Path) -> dict:
    """The network (``NETWORK_KEYS``) of the model in ``path``, as a test of it must configure it. Cached per
    file version: the pipeline asks each time it builds the stage's commands."""
    path = Path(path).resolve()
    stat = path.stat() if path.is_file() else None
    if stat is None:
        _read(path)  # raises the not-found error
    return _network(path, stat.st_mtime_ns, stat.st_size)


def import_model(source: str | Path, out: str | Path) -> dict:
    """Write the suite checkpoint of ``source`` to ``out`` (checked: its weights load into its network); the
    record of where it came from."""
    source, out = Path(source).resolve(), Path(out)
    kind, checkpoint = _read(source)
    save_atomic(checkpoint, out)
    try:
        load_source(out)  # the weights fit the network the hyperparameters describe
    except Exception:
        out.unlink(missing_ok=True)
        raise
    hparams, origin = checkpoint["hyper_parameters"], checkpoint.get("imported_from") or {}
    sha256 = origin.get("sha256") or file_hash(source, "sha256")  # a library import hashed the file already
    return {"file": str(source), "format": kind, "sha256": sha256,
            "network": {k: hparams.get(k) for k in NETWORK_KEYS},
            "epoch": origin.get("epoch", checkpoint.get("epoch"))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.imported", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a robustness-library .pt file or a suite .ckpt")
    p.add_argument("out", help="the suite checkpoint to write (.ckpt)")
    p.add_argument("--record", required=True, help="JSON file to write the record of the import to")
    args = p.parse_args(argv)
    try:
        record = import_model(args.source, args.out)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    write_json_atomic(Path(args.record), record)
    print(f"imported {record['file']} ({record['format']}, sha256 {record['sha256']}, {record['network']['arch']}) "
          f"-> {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # a copy and a check: no need for the machine's threads
    main()
