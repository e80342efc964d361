"""The loggers of a measure stage, so that TensorBoard and wandb show the transfer table and Figure 3 next to the
trained models of the same reproduction.

A measure stage uses the ``trainer.logger`` list of the last ``--logger_config`` YAML file that has one (the
runner passes the ``--config`` files of ``reproduce --stage-args``, e.g. configs/loggers/wandb.yaml), every
save_dir sent to the stage's folder as ``train.py --run_dir`` does; without one, CSV and TensorBoard, like the
train configs. wandb runs join the reproduction's group through ``WANDB_RUN_GROUP`` / ``WANDB_JOB_TYPE``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from common.errors import ConfigError
from common.figures import log_figure

DEFAULT_LOGGERS = [{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"name": "csv"}},
                   {"class_path": "pytorch_lightning.loggers.TensorBoardLogger", "init_args": {"name": "tensorboard"}}]


def logger_specs(configs: Sequence[str | Path]) -> list[dict]:
    """``trainer.logger`` of the last config that sets it (as a later ``--config`` wins in train.py)."""
    specs = None
    for path in configs:
        try:
            config = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise FileNotFoundError(f"--logger_config {path}: cannot read it ({err}); pass an existing YAML config "
                                    "such as configs/loggers/wandb.yaml") from err
        logger = (config.get("trainer") or {}).get("logger") if isinstance(config, dict) else None
        if logger is not None:
            specs = logger if isinstance(logger, list) else [logger]
    if specs is None:
        return DEFAULT_LOGGERS
    return [s for s in specs if isinstance(s, dict)]  # `logger: false` means none


def build_loggers(specs: Sequence[Mapping], out: Path, name: str) -> list:
    """Instantiate ``specs`` (class_path + init_args) with their output under ``out``."""
    loggers = []
    for spec in specs:
        if "class_path" not in spec:
            raise ConfigError(f"logger entry {dict(spec)} has no class_path; write it as in configs/loggers/wandb.yaml")
        module, _, cls = spec["class_path"].rpartition(".")
        args = {**(spec.get("init_args") or {}), "save_dir": str(out)}
        if "wandb" in spec["class_path"].lower():
            args.setdefault("name", name)
            if "dir" in args:
                args["dir"] = str(out)
        loggers.append(getattr(importlib.import_module(module), cls)(**args))
    return loggers


def scalars(results: Mapping, prefix: str) -> dict[str, float]:
    """The numbers of a nested results dict as ``prefix/a/b`` scalars (booleans and None left out)."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            flat.update(scalars(value, tag))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[tag] = float(value)
    return flat


def log_measurement(out: Path, name: str, metrics: Mapping[str, float], params: Mapping,
                    figures: Mapping[str, Path] = (), logger_configs: Sequence[str | Path] = ()) -> list:
    """Log ``metrics`` (at step 0), ``params`` (as hyperparameters) and ``figures`` (tag -> PNG) to the loggers;
    the loggers, finalised."""
    loggers = build_loggers(logger_specs(logger_configs), out, name)
    for logger in loggers:
        logger.log_hyperparams(dict(params))
        logger.log_metrics(dict(metrics), step=0)
    for tag, png in dict(figures).items():
        log_figure(loggers, tag, png)
    for logger in loggers:
        logger.finalize("success")
    return loggers
