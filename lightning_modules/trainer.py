"""The suite's Trainer: Lightning's, with ``precision: auto`` (common/numerics.py) resolved when it is built.

The resolved precision is printed, logged as a hyperparameter (``numerics/precision``), written to
``<default_root_dir>/numerics.json`` (which ``reproduce`` copies into ``stage.json``) and stored in every
checkpoint under ``checkpoint["numerics"]``. Its batches are reported to ``reproduce``'s progress view.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import Accelerator
from pytorch_lightning.trainer.connectors.accelerator_connector import _PRECISION_INPUT
from pytorch_lightning.utilities import rank_zero_info

from common import progress
from common.files import write_bytes_atomic
from common.numerics import AUTO, bf16_fast_path, device_type_of, resolve_precision

NUMERICS_JSON = "numerics.json"


class NumericsRecord(pl.Callback):
    """Records the numerics a run resolved: the log line, the loggers, ``numerics.json``, the checkpoints."""

    def __init__(self, numerics: dict) -> None:
        self.numerics = numerics

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams({f"numerics/{k}": v for k, v in self.numerics.items()})
        write_bytes_atomic(Path(trainer.default_root_dir) / NUMERICS_JSON,
                           json.dumps(self.numerics, indent=1).encode())

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint["numerics"] = dict(self.numerics)


class ProgressReport(pl.Callback):
    """A fit's and a test's batches for ``reproduce``'s progress view (common/progress.py; rank 0)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
                           ) -> None:
        if trainer.is_global_zero:
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
            progress.report(f"fit epoch {trainer.current_epoch + 1}/{epochs}", batch_idx + 1,
                            int(trainer.num_training_batches), "batches", step=trainer.global_step)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        if trainer.is_global_zero:
            progress.report("test", batch_idx + 1, int(sum(trainer.num_test_batches)), "batches")


class Trainer(pl.Trainer):
    """``pytorch_lightning.Trainer`` whose ``precision`` also takes ``auto`` (the suite's default)."""

    def __init__(self, *, accelerator: str | Accelerator = "auto",
                 precision: _PRECISION_INPUT | Literal["auto"] | None = AUTO,
                 callbacks: list[pl.Callback] | pl.Callback | None = None, **kwargs) -> None:
        """
        Args:
            accelerator: as Lightning's (``auto``, ``cpu``, ``gpu``, ...): also the device ``auto`` resolves for.
            precision: ``auto`` (bf16-mixed where bf16 is the measured fast path, else 32-true: see
                common/numerics.py) or any precision Lightning takes, kept as given.
            callbacks: as Lightning's; the run's NumericsRecord is added.
            **kwargs: every other argument of ``pytorch_lightning.Trainer``.
        """
        device = device_type_of(accelerator)
        resolved, why = resolve_precision(AUTO if precision is None else precision, device)
        rank_zero_info(why)
        # Plain str/bool values only: a checkpoint holding torch's TorchVersion would not load with weights_only.
        self.numerics = {"requested": str(precision), "precision": str(resolved), "device_type": device,
                         "bf16_fast_path": bf16_fast_path(device)[0], "why": why, "torch": str(torch.__version__),
                         "machine": platform.machine()}
        listed = [callbacks] if isinstance(callbacks, pl.Callback) else list(callbacks or [])
        super().__init__(accelerator=accelerator, precision=resolved,
                         callbacks=[*listed, NumericsRecord(self.numerics), ProgressReport()], **kwargs)
