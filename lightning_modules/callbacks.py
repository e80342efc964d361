"""Callbacks: accuracy under attack, logged to every attached logger (CSV, TensorBoard, wandb), and BatchNorm
statistics recomputed at the end of every training epoch (:class:`RecalibrateBatchNorm`).

:class:`RobustAccuracy`: every ``every_n_epochs``, robust accuracy on a fixed seeded validation subset, as
``val/robust_acc/<norm>_<eps>``. Test: the full sweep over the test set, logged as ``test/robust_acc/...``,
written as ``robust_accuracy.json`` and ``robust_accuracy.png`` next to the run, and sent to TensorBoard and
wandb as a figure. Under DDP every rank attacks its own contiguous shard (no padded duplicates) and the
counts are summed, so the numbers equal a single-device run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_info
from rich.progress import track
from torch import nn

from attacks import eval_mode, point_key, robust_accuracy
from common import progress
from common.attack_settings import SWEEP_STEPS
from common.errors import ConfigError
from common.figures import log_figure, pyplot, save_figure
from common.files import write_bytes_atomic
from common.tensors import as_float_images, rank_subset, summed_fractions
from models.fusion import as_attacked

Point = tuple[str, float]


def parse_points(points: Sequence) -> list[Point]:
    """``["l2:0.25", ["linf", 0.0314]]`` -> ``[("l2", 0.25), ("linf", 0.0314)]``; eps may be ``8/255``."""
    parsed = []
    for p in points:
        norm, eps = p.split(":") if isinstance(p, str) else p
        if isinstance(eps, str):
            num, _, den = eps.partition("/")
            eps = float(num) / float(den or 1)
        parsed.append((str(norm).lower(), float(eps)))
    return parsed


# ------------------------------------------------------------------------------------------ accuracy under attack



# The accuracies are already summed over the ranks (summed_fractions), so every rank logs the same number. Lightning
# asks for sync_dist on epoch-level values under DDP; syncing with max over equal values returns that number
# exactly (a mean could round).
SYNCED = {"sync_dist": True, "reduce_fx": "max"}

class RobustAccuracy(pl.Callback):
    """Robust accuracy during validation (subset) and test (full sweep, table, plot)."""

    def __init__(self, val_points: Sequence = ("l2:0.25",), test_points: Sequence = (
                     "l2:0", "l2:0.25", "l2:0.5", "l2:1.0", "linf:0", "linf:2/255", "linf:4/255", "linf:8/255"),
                 every_n_epochs: int = 1, val_examples: int = 500, test_examples: int | None = None,
                 val_steps: int = 10, test_steps: int = SWEEP_STEPS, batch_size: int = 250, seed: int = 0,
                 autoattack_points: Sequence = (), autoattack_examples: int = 1000,
                 fold_batchnorm: bool = True) -> None:
        """
        Args:
            val_points: (norm, eps) points evaluated during validation, as ``"l2:0.25"`` or ``"linf:8/255"``.
            test_points: the sweep evaluated at test time (eps 0 is the clean accuracy).
            every_n_epochs: validation evaluation frequency.
            val_examples: size of the fixed, seeded validation subset.
            test_examples: number of test examples in the sweep (default: all).
            val_steps: PGD steps during validation (step size 2.5 * eps / steps).
            test_steps: PGD steps of the test sweep.
            batch_size: attack batch size per device.
            seed: seed of the validation subset.
            autoattack_points: optional evaluation of record at test time with AutoAttack (standard version),
                logged as ``test/autoattack_torchattacks/<norm>_<eps>``: it is torchattacks' re-implementation,
                not the reference code (results can differ slightly). Needs ``pip install torchattacks``.
            autoattack_examples: number of test examples AutoAttack runs on.
            fold_batchnorm: attack a copy of the model with its BatchNorm layers folded into the convolutions
                (models/fusion.py): the same eval-mode function, rounded differently, 1.06-1.24x faster per attack
                step on CPUs (docs/NUMERICS.md). AutoAttack always sees the model as it is.
        """
        if not isinstance(fold_batchnorm, bool):
            raise ConfigError(f"fold_batchnorm must be true or false, got {fold_batchnorm!r}; fix the "
                              "RobustAccuracy callback's init_args.fold_batchnorm")
        self.val_points, self.test_points = parse_points(val_points), parse_points(test_points)
        self.every_n_epochs, self.val_examples, self.test_examples = every_n_epochs, val_examples, test_examples
        self.val_steps, self.test_steps, self.batch_size, self.seed = val_steps, test_steps, batch_size, seed
        self.autoattack_points, self.autoattack_examples = parse_points(autoattack_points), autoattack_examples
        self.fold_batchnorm = fold_batchnorm
        self.results: dict[str, float] = {}

    def _examples(self, trainer: pl.Trainer, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a fixed, seeded choice of ``limit`` examples of ``split``."""
        x, y = rank_subset(*getattr(trainer.datamodule, split), limit=limit, seed=self.seed)
        return x, y

    def _measure(self, trainer, pl_module, split: str, points: list[Point], limit, steps: int) -> dict[str, float]:
        x, y = self._examples(trainer, split, limit)
        bf16 = str(trainer.precision).startswith("bf16")
        channels_last = bool(pl_module.hparams.get("channels_last", False))
        options = dict(steps=steps, batch_size=self.batch_size, autocast_dtype=torch.bfloat16 if bf16 else None,
                       channels_last=channels_last)
        # folded, a copy: the trained module itself is never changed (it is channels_last already when asked)
        model = as_attacked(pl_module.model, fold=self.fold_batchnorm, channels_last=channels_last)
        acc = {}
        for i, point in enumerate(track(points, description=f"{split} accuracy under attack",
                                        disable=not trainer.is_global_zero)):
            acc.update(robust_accuracy(model, as_float_images(x), y, [point], **options))
            if trainer.is_global_zero:
                progress.report(f"{split} accuracy under attack", i + 1, len(points), "points", force=True)
        fractions = summed_fractions(trainer.strategy, [acc[point_key(*p)] * len(y) for p in points],
                                     [len(y)] * len(points), pl_module.device)
        return {point_key(*p): f for p, f in zip(points, fractions, strict=True)}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        acc = self._measure(trainer, pl_module, "val", self.val_points, self.val_examples, self.val_steps)
        for key, value in acc.items():
            pl_module.log(f"val/robust_acc/{key}", value, **SYNCED)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.results = self._measure(trainer, pl_module, "test", self.test_points, self.test_examples,
                                     self.test_steps)
        for key, value in self.results.items():
            pl_module.log(f"test/robust_acc/{key}", value, **SYNCED)
        for (norm, eps), value in self._autoattack(trainer, pl_module).items():
            pl_module.log(f"test/autoattack_torchattacks/{point_key(norm, eps)}", value, **SYNCED)
        out = Path(trainer.log_dir or trainer.default_root_dir)  # a broadcast under DDP: every rank must ask
        if trainer.is_global_zero:
            self._report(trainer, out)

    def _autoattack(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[Point, float]:
        """Accuracy under torchattacks' AutoAttack at each requested point (summed over ranks)."""
        if not self.autoattack_points:
            return {}
        try:
            import torchattacks
        except ImportError as err:
            raise ImportError("autoattack_points needs torchattacks: pip install torchattacks") from err
        x, y = self._examples(trainer, "test", self.autoattack_examples)
        x, y = as_float_images(x).to(pl_module.device), y.to(pl_module.device)
        model, correct = pl_module.model, []
        for norm, eps in self.autoattack_points:
            attack = torchattacks.AutoAttack(model, norm={"l2": "L2", "linf": "Linf"}[norm], eps=eps,
                                             n_classes=pl_module.hparams.get("num_classes", 10), seed=self.seed)
            with eval_mode(model), torch.enable_grad():  # test hooks run under no_grad
                correct.append(sum(int((model(attack(xb, yb)).argmax(1) == yb).sum()) for xb, yb in
                                   zip(x.split(self.batch_size), y.split(self.batch_size), strict=True)))
        fractions = summed_fractions(trainer.strategy, correct, [len(y)] * len(correct), pl_module.device)
        return dict(zip(self.autoattack_points, fractions, strict=True))

    def _report(self, trainer: pl.Trainer, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"norm": n, "eps": e, "robust_acc": self.results[point_key(n, e)]} for n, e in self.test_points]
        write_bytes_atomic(out / "robust_accuracy.json",
                           json.dumps({"steps": self.test_steps, "rows": rows}, indent=1).encode())
        rank_zero_info("accuracy under attack:\n" + "\n".join(
            f"  {r['norm']:>4} eps={r['eps']:.4f}  {100 * r['robust_acc']:6.2f}%" for r in rows))
        figure = accuracy_vs_eps_figure(rows)
        save_figure(figure, out / "robust_accuracy.png", dpi=100, close=False)  # log_figure closes it
        log_figure(trainer.loggers, "test/robust_accuracy", out / "robust_accuracy.png", figure=figure,
                   step=trainer.global_step)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("test/robust_accuracy_table", markdown_table(rows), trainer.global_step)
            elif isinstance(logger, WandbLogger):
                logger.log_table("test/robust_accuracy_table", columns=list(rows[0]),
                                 data=[list(r.values()) for r in rows])


# ------------------------------------------------------------------------------------------- BatchNorm statistics


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace every BatchNorm layer's running statistics by their plain average over ``batches`` (as "precise
    BN"); the weights are untouched. Returns the number of BatchNorm layers (0: nothing to do)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # only the BatchNorm layers collect statistics; anything else (dropout) stays deterministic
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        for xb in batches:
            model(xb)
    finally:
        for m, training in modes:
            m.training = training
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
    return len(norms)


class RecalibrateBatchNorm(pl.Callback):
    """At the end of every training epoch (before validation and checkpointing), recompute the BatchNorm running
    statistics from ``examples`` training images.

    Why: on the squares data, Adam moves the weights fast enough that BatchNorm's running averages (momentum 0.1)
    lag behind, and the eval-mode network (the one attacked, SPEC 0) collapses to a constant prediction in some
    epochs (measured with the fast CNN: eval accuracy 0.51 against 0.94 with batch statistics; recalibrated 0.94).
    Only the statistics change, never the weights."""

    def __init__(self, examples: int = 2000, batch_size: int = 500) -> None:
        """
        Args:
            examples: the first this many training images give the statistics.
            batch_size: images per forward pass (each batch's statistics enter the average equally).
        """
        if examples < 1 or batch_size < 2:
            raise ConfigError(f"examples must be >= 1 and batch_size >= 2, got {examples} and {batch_size}")
        self.examples, self.batch_size = examples, batch_size

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if batch_idx + 1 != trainer.num_training_batches:  # the epoch's last batch, before validation
            return
        x = trainer.datamodule.train[0][: self.examples]
        batches = (as_float_images(xb.to(pl_module.device)) for xb in x.split(self.batch_size))
        # pl_module's forward applies its input options (channels_last); the plugin's context its precision.
        with trainer.precision_plugin.forward_context():
            recalibrate_batchnorm(pl_module, batches)


# -------------------------------------------------------------------------------------------------------- figures


def markdown_table(rows: list[dict]) -> str:
    lines = ["| norm | eps | robust acc |", "|---|---|---|"]
    lines += [f"| {r['norm']} | {r['eps']:.4f} | {100 * r['robust_acc']:.2f}% |" for r in rows]
    return "\n".join(lines)


def accuracy_vs_eps_figure(rows: list[dict]):
    plt = pyplot()
    norms = sorted({r["norm"] for r in rows})
    fig, axes = plt.subplots(1, len(norms), figsize=(4 * len(norms), 3.2), squeeze=False)
    for ax, norm in zip(axes[0], norms, strict=True):
        pts = sorted((r["eps"], r["robust_acc"]) for r in rows if r["norm"] == norm)
        ax.plot([e for e, _ in pts], [100 * a for _, a in pts], marker="o")
        ax.set(xlabel=f"{norm} eps", ylabel="accuracy (%)", ylim=(0, 100), title=f"accuracy under {norm} PGD")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
