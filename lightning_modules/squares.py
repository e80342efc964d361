"""The measurement of the adversarial-squares experiment (SPEC 4.3, ``datamodules/squares.py``).

At test time :class:`SquaresRobustness` measures, on the squares test set: the fraction of test points whose
prediction a Linf PGD attack of radius ``eps`` (0.01) flips, the same fraction among the clean-correct points,
a sweep of such fractions over ``sweep`` radii, the train and test accuracy (train accuracy split into the
label-noise images and the others: memorising the former is what makes the network fragile), and the robustness
radius of the linear classifier ``sign(mean of the pixels)`` on the same test points (analytic: ``|mean(x)|``).
Everything is logged as ``test/squares/...`` to every logger and written as ``squares.json`` next to the run,
plus a copy ``squares_<n>epochs.json`` per training length (so the epoch-1 and the last checkpoint of one run
can both be measured into the same folder) and ``squares.png`` drawing every such copy in the folder.
``python -m lightning_modules.squares A/squares.json B/squares.json -o fig.png`` draws runs of different folders
(e.g. the pipeline's ``squares`` and ``squares_1epoch`` stages) on one figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor, nn

from attacks import eval_mode, pgd, point_key, predict
from attacks.evaluate import model_device
from attacks.pgd import check_attack_args
from common.errors import ConfigError
from common.figures import log_figure, pyplot, save_figure
from common.files import write_bytes_atomic
from common.tensors import as_float_images, rank_slice, summed_fractions

JSON_NAME, FIGURE_NAME = "squares.json", "squares.png"
STEPS_PER_EPOCH_KEY = "squares_steps_per_epoch"  # stored in checkpoints by SquaresRobustness


# ----------------------------------------------------------------------------- the linear classifier, analytic


def linear_radius(x: Tensor) -> Tensor:
    """Per example, the Linf distance from ``x`` to the decision boundary of ``sign(mean of the pixels)``.

    Moving every pixel by ``eps`` moves the mean by at most ``eps`` (and exactly ``eps`` when all move the same
    way), so the boundary ``mean = 0`` is at Linf distance ``|mean(x)|``."""
    return x.flatten(1).mean(dim=1).abs()


class PixelMeanClassifier(nn.Module):
    """The linear classifier ``sign(mean of the pixels)`` as a 2-class model: logits ``(-m, m)``, ``m = mean(x)``
    (class 1 is ``Y = +1``). Its Linf robustness radius at ``x`` is :func:`linear_radius`."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.flatten(1).mean(dim=1, keepdim=True)
        return torch.cat([-m, m], dim=1)


# --------------------------------------------------------------------------------------------- flip fractions


def attack_squares(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int = 20, step_size: float | None = None
) -> Tensor:
    """Untargeted Linf PGD away from ``y`` (e.g. the model's own predictions) within ``eps`` of ``x``: ``steps``
    sign steps of ``step_size`` (default ``2.5 * eps / steps``), no random start, stopping early once every
    example is flipped. Pixels are not clamped to any range."""
    step_size = 2.5 * eps / steps if step_size is None else step_size
    # bounds=None: squares images live in [-1.1, 1.1], not [0, 1]. Clamping to [0, 1] would move every negative
    # pixel by ~1, far beyond eps (and pgd's bounds check rejects such inputs anyway).
    return pgd(model, x, y, norm="linf", eps=eps, step_size=step_size, steps=steps, bounds=None, early_stop=True)


def flipped_by_attack(
    model: nn.Module, x: Tensor, *, eps: float, steps: int = 20, step_size: float | None = None,
    batch_size: int = 500,
) -> tuple[Tensor, Tensor]:
    """``(clean predictions, flipped mask)`` of ``model`` on ``x`` (on ``x``'s device).

    ``flipped[i]`` is True when :func:`attack_squares` finds a point within Linf ``eps`` of ``x[i]`` with another
    prediction than ``x[i]``'s. Attacking the prediction rather than the label also counts flips of wrongly
    classified points (the label-noise images).
    """
    check_attack_args("linf", eps, 2.5 * eps / steps if step_size is None else step_size, steps)
    preds, flips = [], []
    device = model_device(model, x.device)
    with eval_mode(model):
        for xb in x.split(batch_size):
            xb = xb.to(device)
            pred = predict(model, xb, batch_size=batch_size)
            x_adv = attack_squares(model, xb, pred, eps=eps, steps=steps, step_size=step_size)
            preds.append(pred.to(x.device))
            flips.append((predict(model, x_adv, batch_size=batch_size) != pred).to(x.device))
    if not preds:
        return torch.empty(0, dtype=torch.long, device=x.device), torch.empty(0, dtype=torch.bool, device=x.device)
    return torch.cat(preds), torch.cat(flips)


# ------------------------------------------------------------------------------------------ BatchNorm statistics


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
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


# ------------------------------------------------------------------------------------------------ the callback


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

    def _shard(self, split: tuple[Tensor, Tensor], limit: int | None, *extra: Tensor) -> list[Tensor]:
        """The first ``limit`` examples of ``split`` (and the aligned ``extra`` tensors), this rank's part."""
        n = len(split[1]) if limit is None else min(limit, len(split[1]))
        return rank_slice(*(t[:n] for t in (*split, *extra)))

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
        if trainer.is_global_zero:
            self.results = self._results(trainer, pl_module, metrics, sweep_keys, time.perf_counter() - start)
            self._report(trainer)

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

    def _report(self, trainer: pl.Trainer) -> None:
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
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
        figure = squares_figure(load_runs([out]))
        save_figure(figure, out / FIGURE_NAME, dpi=100, close=False)  # log_figure closes it
        log_figure(trainer.loggers, "test/squares", out / FIGURE_NAME, figure=figure, step=trainer.global_step)


def json_name(epochs: float | None) -> str:
    """The per-training-length copy of the results: ``squares_1epoch.json``, ``squares_20epochs.json``."""
    return f"squares_{'unknown_' if epochs is None else epochs}epoch{'s' * (epochs != 1)}.json"


def load_runs(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """The contents of squares JSON files; a folder stands for its per-training-length files
    (``squares_<n>epochs.json``). Sorted by training length."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("squares_*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} not found: `python train.py test --config configs/.../squares.yaml "
                                    "--ckpt_path ...` writes squares.json into the run's folder")
    runs = [json.loads(f.read_text()) for f in files]
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw squares runs (their squares.json) on one figure.")
    parser.add_argument("runs", nargs="+", help="squares.json files, or folders of squares_<n>epochs.json files")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from err
    if not runs:
        raise SystemExit(f"no squares_<n>epochs.json in {args.runs}; run the test stage first")
    squares_figure(runs).savefig(args.output, dpi=120)
    print(f"wrote {args.output} ({len(runs)} runs)")


if __name__ == "__main__":
    main()
