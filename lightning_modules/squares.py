"""The measurement of the adversarial-squares experiment (SPEC 4.3, ``datamodules/squares.py``).

At test time :class:`SquaresRobustness` measures, on the squares test set: the fraction of test points whose
prediction a Linf PGD attack of radius ``eps`` (0.01) flips, the same fraction among the clean-correct points,
a sweep of such fractions over ``sweep`` radii, the train and test accuracy (train accuracy split into the
label-noise images and the others: memorising the former is what makes the network fragile), and the robustness
radius of the linear classifier ``sign(mean of the pixels)`` on the same test points (analytic: ``|mean(x)|``).
The attack and the linear classifier are in ``attacks/squares.py``; the BatchNorm recalibration the squares
configs train with is ``lightning_modules.RecalibrateBatchNorm``.
Everything is logged as ``test/squares/...`` to every logger and written as ``squares.json`` next to the run,
plus a copy ``squares_<n>epochs.json`` per training length (so the epoch-1 and the last checkpoint of one run
can both be measured into the same folder) and ``squares.png`` drawing every such copy in the folder.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from attacks import check_attack_args, flipped_by_attack, linear_radius, point_key, predict
from common.errors import ConfigError
from common.figures import log_figure, pyplot, save_figure
from common.files import write_bytes_atomic
from common.tensors import as_float_images, rank_subset, summed_fractions

JSON_NAME, FIGURE_NAME = "squares.json", "squares.png"
STEPS_PER_EPOCH_KEY = "squares_steps_per_epoch"  # stored in checkpoints by SquaresRobustness


class SquaresRobustness(pl.Callback):
    """At test time: flip fractions under Linf PGD, train/test accuracy and the linear classifier's radius on the
    squares data, logged as ``test/squares/...`` and written to ``squares.json`` (+ a per-length copy) and
    ``squares.png``."""

    def __init__(self, eps: float = 0.01, sweep: Sequence[float] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                 steps: int = 20, test_examples: int | None = None, sweep_examples: int | None = 500,
                 batch_size: int = 500, output_dir: str | None = None, label: str | None = None) -> None:
        """
        Args:
            eps: Linf radius of the headline measurement (the spec: 0.01), on ``test_examples`` test points.
            sweep: further Linf radii for the figure (flip fraction against eps), on ``sweep_examples`` points;
                1.0 reaches the linear classifier's radius (~1).
            steps: PGD steps per attack (step size ``2.5 * eps / steps``, no random start, early stop once every
                point of a batch is flipped).
            test_examples: the first this many test points are attacked at ``eps`` (default: all).
            sweep_examples: the first this many test points are attacked at each ``sweep`` radius (default: all).
            batch_size: attack and evaluation batch size per device.
            output_dir: folder of ``squares.json``, ``squares_<n>epochs.json`` and ``squares.png`` (default: the
                run's log directory).
            label: name of the run in figures comparing runs (default: "<arch>, <n> epochs").
        """
        for e in (eps, *sweep):
            check_attack_args("linf", e, 2.5 * e / steps, steps)
        self.eps, self.sweep = float(eps), sorted({float(e) for e in sweep} - {float(eps)})
        self.steps, self.test_examples, self.sweep_examples = steps, test_examples, sweep_examples
        self.batch_size, self.output_dir, self.label = batch_size, output_dir, label
        self.checkpoint: dict | None = None  # how long the model loaded by `test --ckpt_path` trained
        self.steps_per_epoch: int | None = None
        self.results: dict = {}

    @staticmethod
    def _steps_per_epoch(trainer: pl.Trainer) -> int:
        return math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps_per_epoch, self.checkpoint = self._steps_per_epoch(trainer), None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # The checkpoint's "epoch" depends on when it was saved (epoch end or train end): optimizer steps over
        # steps per epoch is unambiguous.
        checkpoint[STEPS_PER_EPOCH_KEY] = self._steps_per_epoch(trainer)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # `test --ckpt_path` restores the weights but not the loop counters: remember how long the model trained.
        self.checkpoint = {"global_step": checkpoint.get("global_step"),
                           "steps_per_epoch": checkpoint.get(STEPS_PER_EPOCH_KEY),
                           "path": str(trainer.ckpt_path) if trainer.ckpt_path else None}

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.checkpoint = None  # a later test of the in-memory model must not report this checkpoint

    def _trained(self, trainer: pl.Trainer) -> dict:
        """How long the measured model trained: ``{"epochs", "global_step", "steps_per_epoch", "path"}``."""
        if self.checkpoint is not None:
            trained = dict(self.checkpoint)
        else:  # measured in the process that trained it (or an untrained model)
            trained = {"global_step": trainer.global_step, "steps_per_epoch": self.steps_per_epoch, "path": None}
        steps, per_epoch = trained["global_step"], trained["steps_per_epoch"]
        if steps == 0:
            trained["epochs"] = 0
        elif steps is None or not per_epoch:
            trained["epochs"] = None
        else:  # an integer for epoch-end checkpoints
            epochs = steps / per_epoch
            trained["epochs"] = int(epochs) if epochs == int(epochs) else round(epochs, 2)
        return trained

    @staticmethod
    def _shard(split: tuple[Tensor, Tensor], limit: int | None, *extra: Tensor) -> list[Tensor]:
        """The first ``limit`` examples of ``split`` (and the aligned ``extra`` tensors), this rank's part."""
        return rank_subset(*split, *extra, limit=limit)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        for attr in ("train", "test", "train_flipped", "test_flipped"):
            if getattr(dm, attr, None) is None:
                raise TypeError(f"SquaresRobustness needs the squares data (datamodules.SquaresDataModule), got "
                                f"{type(dm).__name__} without .{attr}; use it only with configs/*/squares.yaml")
        start = time.perf_counter()
        model, device = pl_module.model, pl_module.device
        counts: dict[str, float] = {}  # per-rank counts, summed over ranks below
        sizes: dict[str, int] = {}

        def add(key: str, mask: Tensor, size: int) -> None:
            counts[key], sizes[key] = float(mask.sum()), size

        # Accuracy on the whole training set, split into label-noise (flipped) images and clean ones.
        tx, ty, tflip = self._shard(dm.train, None, dm.train_flipped)
        ok = predict(model, as_float_images(tx), batch_size=self.batch_size) == ty  # batches go to the device
        add("train_acc", ok, len(ty))
        add("train_acc_flipped_images", ok[tflip], int(tflip.sum()))
        add("train_acc_unflipped_images", ok[~tflip], int((~tflip).sum()))

        # The headline: flips at eps, among all points and among the clean-correct ones.
        x, y, flip = self._shard(dm.test, self.test_examples, dm.test_flipped)
        x = as_float_images(x)
        pred, flipped = flipped_by_attack(model, x, eps=self.eps, steps=self.steps, batch_size=self.batch_size)
        correct = pred == y
        add("test_acc", correct, len(y))
        add("flip_fraction", flipped, len(y))
        add("flip_fraction_correct", flipped[correct], int(correct.sum()))
        linear = linear_radius(x)
        linear_correct = (x.flatten(1).mean(1) > 0).long() == y
        add("linear_test_acc", linear_correct, len(y))
        add("linear_flip_fraction", linear <= self.eps, len(y))

        # The sweep for the figure, on a (smaller) prefix of the same points.
        sx, sy = self._shard(dm.test, self.sweep_examples)
        sx = as_float_images(sx)
        sweep_keys = {}
        for eps in self.sweep:
            key = point_key("linf", eps)
            sweep_keys[eps] = key
            _, f = flipped_by_attack(model, sx, eps=eps, steps=self.steps, batch_size=self.batch_size)
            add(f"flip_fraction/{key}", f, len(sy))
            add(f"linear_flip_fraction/{key}", linear_radius(sx) <= eps, len(sy))

        keys = list(counts)
        # Shards are disjoint and unpadded: summed counts and sizes equal a single-device run.
        fractions = summed_fractions(trainer.strategy, [counts[k] for k in keys], [sizes[k] for k in keys], device)
        metrics = dict(zip(keys, fractions, strict=True))
        # The radius statistics need no reduction: every rank computes them on all the attacked points (cheap).
        n_test = len(dm.test[1]) if self.test_examples is None else min(self.test_examples, len(dm.test[1]))
        radius = linear_radius(as_float_images(dm.test[0][:n_test]))
        metrics.update(linear_radius_mean=float(radius.mean()), linear_radius_min=float(radius.min()),
                       linear_radius_max=float(radius.max()))
        for key, value in metrics.items():
            pl_module.log(f"test/squares/{key}", value)
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)  # log_dir: a DDP broadcast
        if trainer.is_global_zero:
            self.results = self._results(trainer, pl_module, metrics, sweep_keys, time.perf_counter() - start)
            self._report(trainer, out)

    def _results(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: dict[str, float],
                 sweep_keys: dict[float, str], seconds: float) -> dict:
        dm, hp = trainer.datamodule, pl_module.hparams
        trained = self._trained(trainer)
        epochs = trained["epochs"]
        n_test = len(dm.test[1]) if self.test_examples is None else min(self.test_examples, len(dm.test[1]))
        n_sweep = len(dm.test[1]) if self.sweep_examples is None else min(self.sweep_examples, len(dm.test[1]))
        curve = [{"eps": self.eps, "n": n_test, "flip_fraction": metrics["flip_fraction"],
                  "linear_flip_fraction": metrics["linear_flip_fraction"]}]
        curve += [{"eps": eps, "n": n_sweep, "flip_fraction": metrics[f"flip_fraction/{key}"],
                   "linear_flip_fraction": metrics[f"linear_flip_fraction/{key}"]} for eps, key in sweep_keys.items()]
        return {
            "label": self.label or f"{hp.get('arch', 'model')}, {epochs} epoch{'s' * (epochs != 1)}",
            "eps": self.eps,
            "attack": {"norm": "linf", "steps": self.steps, "step_size": "2.5 * eps / steps", "random_start": False,
                       "target": "the model's clean prediction", "bounds": None},
            "test_examples": n_test,
            "sweep_examples": n_sweep,
            "metrics": metrics,
            "linear_radius": {"mean": metrics["linear_radius_mean"], "min": metrics["linear_radius_min"],
                              "max": metrics["linear_radius_max"],
                              "guaranteed_lower_bound": getattr(dm, "linear_radius_bound", None)},
            "curve": sorted(curve, key=lambda r: r["eps"]),
            "trained": trained,
            "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in hp.items()},
            "data": {"train_size": len(dm.train[1]), "test_size": len(dm.test[1]),
                     "input_noise": getattr(dm, "input_noise", None), "flip_prob": getattr(dm, "flip_prob", None),
                     "image_shape": list(getattr(dm, "image_shape", ())), "seed": getattr(dm, "seed", None)},
            "seconds": round(seconds, 1),
        }

    def _report(self, trainer: pl.Trainer, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.results, indent=1, default=str).encode()
        # squares.json: this measurement (what pipeline/outputs.py reads); squares_<n>epochs.json: kept per
        # training length, so measuring the epoch-1 and the last checkpoint into one folder keeps both.
        write_bytes_atomic(out / JSON_NAME, data)
        path = out / json_name(self.results["trained"]["epochs"])
        write_bytes_atomic(path, data)
        m, r = self.results["metrics"], self.results["linear_radius"]
        rank_zero_info(
            f"squares ({self.results['label']}): train acc {m['train_acc']:.4f} (label-noise images "
            f"{m['train_acc_flipped_images']:.4f}), test acc {m['test_acc']:.4f}; Linf eps {self.eps} flips "
            f"{m['flip_fraction']:.4f} of the test points ({m['flip_fraction_correct']:.4f} of the clean-correct); "
            f"linear classifier radius mean {r['mean']:.4f}, min {r['min']:.4f}; {self.results['seconds']} s -> {path}")
        # One figure of every run measured into this folder (e.g. the 1-epoch and the fully trained network).
        figure = squares_figure(load_runs(out))
        save_figure(figure, out / FIGURE_NAME, dpi=100, close=False)  # log_figure closes it
        log_figure(trainer.loggers, "test/squares", out / FIGURE_NAME, figure=figure, step=trainer.global_step)


def json_name(epochs: float | None) -> str:
    """The per-training-length copy of the results: ``squares_1epoch.json``, ``squares_20epochs.json``."""
    return f"squares_{'unknown_' if epochs is None else epochs}epoch{'s' * (epochs != 1)}.json"


def load_runs(folder: Path) -> list[dict]:
    """The per-training-length results (``squares_<n>epochs.json``) in ``folder``, sorted by training length."""
    runs = [json.loads(f.read_text()) for f in sorted(Path(folder).glob("squares_*.json"))]
    return sorted(runs, key=lambda run: run["trained"].get("epochs") or 0)


# ---------------------------------------------------------------------------------------------------- figures


def squares_figure(runs: Sequence[Mapping]):
    """Flip fraction against Linf eps for each run (contents of a ``squares.json``), with the linear classifier's
    (analytic, on the first run's test points) and its smallest radius marked."""
    plt = pyplot()
    if not runs:
        raise ConfigError("squares_figure needs at least one run (the contents of a squares.json)")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for run in runs:
        pts = [(r["eps"], r["flip_fraction"]) for r in run["curve"]]
        ax.plot(*zip(*pts, strict=True), marker="o", label=run["label"])
    first = runs[0]
    linear = [(r["eps"], r["linear_flip_fraction"]) for r in first["curve"]]
    ax.plot(*zip(*linear, strict=True), marker="s", linestyle="--", color="gray", label="linear sign(mean pixel)")
    ax.axvline(first["linear_radius"]["min"], color="gray", linestyle=":",
               label=f"linear radius (min {first['linear_radius']['min']:.3f})")
    ax.set(xscale="log", xlabel="Linf eps", ylabel="fraction of test points flipped", ylim=(-0.02, 1.02),
           title="adversarial squares")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
