"""Recipes of the constructed datasets: what happens to one batch of training images.

A recipe maps ``(source models, Batch) -> RecipeOutput(x_new, y_new, stats)``. Everything else (sharding,
per-example seeds, the cache, resume, logging) is the engine's job (``engine.py`` and ``store.py`` beside this
file), so a new dataset is one small class here. Each example's randomness comes from its own generator
(``Batch.generators``), seeded from the generation seed and the example's index in the original training
set: a recipe never draws from a shared stream, so the output does not depend on batching or world size.

- ``RelabelByAttack``: D_rand / D_det (Ilyas et al. Sec. 3.2), targeted PGD (L2, or Linf with ``norm="linf"``),
  label = target. Also Nakkiran's plain-PGD baseline (SPEC 4.2: L2 eps 2.5 or Linf eps 8/255, 10 steps).
- ``NonTransferableAttack``: Nakkiran's D_det (SPEC 4.1-4.2), targeted PGD on the target model while an
  ensemble of independently trained models keeps the true label; label = target.
- ``RepresentationInversion``: D_R / D_NR (Ilyas et al. Sec. 3.1), match the source's representation
  starting from another training image, label = original label.
- ``RelabelByPrediction``: Wallace's relabelled data (SPEC 5.3), the images unchanged, label = the source's
  prediction; optionally only the images the source gets wrong (``keep``, below).

A recipe maps a batch to a batch of the same size; a recipe that trains on only some examples names a per-example
statistic in ``keep`` and the training set is the examples where it is nonzero (``ConstructedSet.training_set``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks import check_attack_args, pgd
from attacks.ensemble import make_ensemble, nakkiran_loss
from attacks.pgd import LossFn
from attacks.representation import invert
from common.datasets import MNIST_MEAN, MNIST_STD
from common.errors import ConfigError
from common.tensors import as_float_images

TARGET_RULES = ("random", "shift")
PIXEL_MOMENTS = {"mnist": (MNIST_MEAN[0], MNIST_STD[0])}  # RelabelByPrediction(moments_of=...): mean, std


@dataclass
class Batch:
    """One generation batch. Tensors without a note live on the generation device."""

    x: Tensor  # clean images [B, C, H, W], float in [0, 1]
    y: Tensor  # true labels [B]
    indices: Tensor  # (CPU) indices of the examples in the original training set
    positions: Tensor  # (CPU) positions in ``pool``, the training set being constructed
    generators: list[torch.Generator]  # (CPU) one per example, seeded from (seed, original index)
    pool: Tensor  # (CPU) every image of the training set being constructed (uint8 or float)
    num_classes: int
    autocast_dtype: torch.dtype | None = None  # forward numerics (None: fp32)
    channels_last: bool = False


class RecipeOutput(NamedTuple):
    x: Tensor  # constructed images [B, C, H, W], float in [0, 1]
    y: Tensor  # their labels [B]
    stats: dict[str, Tensor]  # per-example float statistics [B]; the engine stores them and reports means


def autocast(batch: Batch, device: torch.device):
    if batch.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=batch.autocast_dtype)


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).flatten(1).norm(dim=1)


class Recipe:
    """Base class. Subclasses set ``name``, ``steps`` and ``source_count``, keep their constructor arguments in
    ``self._config`` and implement ``__call__``.

    ``config()`` enters the cache key together with ``name``, so two recipes with equal name and config must
    produce the same data (bump the name if a code change alters the output).
    """

    name: str = "recipe"
    steps: int = 0  # gradient steps per image, for the throughput in image-steps per second
    # How many source checkpoints the recipe takes: (at least, at most; None for no limit). The DataModule
    # checks it at construction (check_sources), before any data is loaded or written.
    source_count: tuple[int, int | None] = (1, None)
    # A per-example statistic: the training set is the examples where it is nonzero (None: every example).
    keep: str | None = None

    def config(self) -> dict:
        return dict(self._config)

    def describe(self) -> dict:
        """A plain, JSON-able description (for hyperparameters and the manifest)."""
        return {"name": self.name, **self.config()}

    def class_path(self) -> str:
        """The class as configs name it: ``datamodules.<Class>`` for the recipes of this module (the package
        exports them), the full module path for any other."""
        cls = type(self)
        module = "datamodules" if cls.__module__ == __name__ else cls.__module__
        return f"{module}.{cls.__qualname__}"

    def __call__(self, sources: Sequence[nn.Module], batch: Batch) -> RecipeOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    def check_sources(self, count: int) -> None:
        """Refuse ``count`` source checkpoints if the recipe takes another number (``source_count``)."""
        low, high = self.source_count
        if not (low <= count and (high is None or count <= high)):
            raise ConfigError(f"{self.source_count_problem(count)}; fix data.init_args.sources")

    def source_count_problem(self, count: int) -> str:
        """What is wrong with ``count`` sources, and what they should be."""
        low, high = self.source_count
        if low == high:
            need = f"exactly {'one' if low == 1 else low} source checkpoint{'s' * (low != 1)}"
        else:
            need = f"at least {low} source checkpoint{'s' * (low != 1)}" + (f", at most {high}" if high else "")
        return f"{self.name} uses {need}, got {count}: list the source model's last.ckpt"

    def _single(self, sources: Sequence[nn.Module]) -> nn.Module:
        self.check_sources(len(sources))
        return sources[0]


class RelabelByAttack(Recipe):
    """D_rand / D_det: targeted PGD (L2 by default) towards a target t from a standard model; the new label is t."""

    name = "relabel_by_attack"
    source_count = (1, 1)

    def __init__(self, targets: str = "random", eps: float = 0.5, step_size: float = 0.1, steps: int = 100,
                 use_best: bool = True, shift: int = 1, norm: str = "l2") -> None:
        """
        Args:
            targets: ``random`` (D_rand: t uniform over all classes, t may equal y) or ``shift``
                (D_det: t = (y + shift) mod C).
            eps: radius of the perturbation in [0, 1] pixel units: L2 (Ilyas: 0.5; Nakkiran: 2.5) or Linf
                (Nakkiran: 8/255 = 0.0313725).
            step_size: L2 length of each normalised step (Ilyas: 0.1; Nakkiran: 0.5), or Linf size of each sign
                step (Nakkiran: 2/255 = 0.0078431).
            steps: PGD steps (Ilyas: 100; Nakkiran: 10); no random start, as the robustness library.
            use_best: keep each example's lowest-loss iterate (the robustness library's default).
            shift: the class shift of ``targets="shift"``.
            norm: threat model, ``l2`` (default) or ``linf``.
        """
        if targets not in TARGET_RULES:
            raise ConfigError(f"unknown target rule {targets!r}; choose one of {TARGET_RULES}")
        check_attack_args(norm, eps, step_size, steps, False, (0.0, 1.0))
        self.targets, self.eps, self.step_size, self.steps = targets, eps, step_size, steps
        self.use_best, self.shift, self.norm = use_best, shift, norm
        # norm enters the config (and the cache key) only when not the default, so that L2 datasets cached before
        # the option existed keep their keys.
        self._config = {"targets": targets, "eps": eps, "step_size": step_size, "steps": steps,
                        "use_best": use_best, **({"shift": shift} if targets == "shift" else {}),
                        **({"norm": norm} if norm != "l2" else {})}

    def choose_targets(self, y: Tensor, generators: Sequence[torch.Generator], num_classes: int) -> Tensor:
        """Targets on y's device; random ones drawn on the CPU from each example's own generator."""
        if self.targets == "shift":
            return (y + self.shift) % num_classes
        drawn = [int(torch.randint(num_classes, (1,), generator=g)) for g in generators]
        return torch.tensor(drawn, dtype=torch.long).to(y.device)

    def attack(self, model: nn.Module, batch: Batch, t: Tensor, loss_fn: LossFn | None = None) -> Tensor:
        """Targeted PGD towards ``t`` from the clean batch, no random start (``loss_fn``: see ``attacks.pgd``)."""
        return pgd(model, batch.x, t, norm=self.norm, eps=self.eps, step_size=self.step_size, steps=self.steps,
                   targeted=True, random_start=False, use_best=self.use_best, loss_fn=loss_fn,
                   autocast_dtype=batch.autocast_dtype, channels_last=batch.channels_last)

    def target_stats(self, model: nn.Module, batch: Batch, x_adv: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Per-example statistics of the attacked model on the result, and the size of the perturbation."""
        with torch.no_grad(), autocast(batch, x_adv.device):
            logits = model(x_adv).float()
        stats = {
            "attack_success": (logits.argmax(1) == t).float(),
            "target_loss": F.cross_entropy(logits, t, reduction="none"),  # NaN here means a broken model
            "perturbation_l2": l2_distance(x_adv, batch.x),
        }
        if self.norm == "linf":
            stats["perturbation_linf"] = (x_adv - batch.x).flatten(1).abs().amax(dim=1)
        return stats

    def __call__(self, sources: Sequence[nn.Module], batch: Batch) -> RecipeOutput:
        model = self._single(sources)
        t = self.choose_targets(batch.y, batch.generators, batch.num_classes)
        x_adv = self.attack(model, batch, t)
        return RecipeOutput(x_adv, t, self.target_stats(model, batch, x_adv, t))


class NonTransferableAttack(RelabelByAttack):
    """Nakkiran's non-transferable targeted attack: from x (no random start), PGD descends
    ``CE(f(x), t) + mean_i CE(f_i(x), y)``, pushing the target model f to t while every ensemble member f_i keeps
    the true label y; the new label is t. ``sources`` are the target's checkpoint followed by the members'."""

    name = "non_transferable_attack"
    source_count = (2, None)  # the target, then at least one ensemble member

    def __init__(self, targets: str = "shift", eps: float = 2.5, step_size: float = 0.5, steps: int = 10,
                 use_best: bool = True, shift: int = 1, norm: str = "l2", batched_ensemble: bool = False) -> None:
        """
        Args:
            targets: ``shift`` (Nakkiran's D_det: t = (y + shift) mod C) or ``random`` (t uniform over all
                classes, t may equal y).
            eps: radius of the perturbation in [0, 1] pixel units: L2 (Nakkiran: 2.5) or Linf (8/255 = 0.0313725).
            step_size: L2 length of each normalised step (Nakkiran: 0.5) or Linf sign-step size (2/255 = 0.0078431).
            steps: PGD steps (Nakkiran: 10); no random start.
            use_best: keep each example's iterate with the lowest ensemble loss.
            shift: the class shift of ``targets="shift"``.
            norm: threat model, ``l2`` (default) or ``linf``.
            batched_ensemble: evaluate the ensemble members in one ``torch.func.vmap`` pass (identical
                architectures only) instead of a loop. Both give the same data up to float rounding; on the CPU
                the loop was faster (bench/ensemble_speed.py), on GPUs measure. Part of the cache key.
        """
        super().__init__(targets, eps, step_size, steps, use_best, shift, norm)
        self.batched_ensemble = batched_ensemble
        self._config = {**self._config, "norm": norm, "batched_ensemble": batched_ensemble}

    def source_count_problem(self, count: int) -> str:
        return (f"{self.name} needs the target model followed by at least one ensemble member in `sources`, got "
                f"{count} checkpoint(s): list the target's last.ckpt first, then the members' (e.g. "
                "runs/mini/ensemble/seed_1/checkpoints/last.ckpt, ...). For plain PGD use RelabelByAttack")

    def __call__(self, sources: Sequence[nn.Module], batch: Batch) -> RecipeOutput:
        self.check_sources(len(sources))
        # Built per batch (stacking copies the weights, negligible next to 10 steps of 1 + k models): a recipe
        # holding the sources would keep them, on the device, alive through the training that follows.
        target, ensemble = sources[0], make_ensemble(sources[1:], batched=self.batched_ensemble)
        t = self.choose_targets(batch.y, batch.generators, batch.num_classes)
        x_adv = self.attack(target, batch, t, loss_fn=nakkiran_loss(target, ensemble, batch.y))
        stats = self.target_stats(target, batch, x_adv, t)
        with torch.no_grad(), autocast(batch, x_adv.device):
            member_predictions = ensemble(x_adv).argmax(dim=-1)  # [M, B]
        stats["ensemble_kept_true"] = (member_predictions == batch.y).float().mean(dim=0)
        stats["ensemble_hit_target"] = (member_predictions == t).float().mean(dim=0)
        return RecipeOutput(x_adv, t, stats)


def other_positions(positions: Tensor, generators: Sequence[torch.Generator], pool_size: int) -> Tensor:
    """For each example, a uniformly random position in the pool other than its own (independent of labels)."""
    if pool_size < 2:
        raise ConfigError("representation inversion needs at least two training images to start from")
    drawn = torch.tensor([int(torch.randint(pool_size - 1, (1,), generator=g)) for g in generators])
    return drawn + (drawn >= positions).long()  # skip the example itself


class RepresentationInversion(Recipe):
    """D_R / D_NR: from a random other training image, descend ``||g(z) - g(x)|| / ||g(x)||`` over z in
    [0, 1]^d with L2-normalised steps (g = the source's penultimate representation); the label stays y."""

    name = "representation_inversion"
    source_count = (1, 1)

    def __init__(self, step_size: float = 0.1, steps: int = 1000, use_best: bool = True) -> None:
        """
        Args:
            step_size: length of each L2-normalised gradient step (paper reproductions: 0.1).
            steps: gradient steps (paper reproductions: 1000).
            use_best: keep each example's iterate with the smallest representation distance.
        """
        self.step_size, self.steps, self.use_best = step_size, steps, use_best
        self._config = {"step_size": step_size, "steps": steps, "use_best": use_best}

    def __call__(self, sources: Sequence[nn.Module], batch: Batch) -> RecipeOutput:
        model = self._single(sources)
        device = batch.x.device
        start = as_float_images(batch.pool[other_positions(batch.positions, batch.generators, len(batch.pool))])
        start = start.to(device)
        z, stats = invert(model, batch.x, start, steps=self.steps, step_size=self.step_size, use_best=self.use_best,
                          autocast_dtype=batch.autocast_dtype, channels_last=batch.channels_last)
        with torch.no_grad():
            stats["perturbation_l2"] = l2_distance(z, batch.x)  # how far the result is from the original image
        return RecipeOutput(z, batch.y.clone(), stats)


class RelabelByPrediction(Recipe):
    """Wallace's "learning from incorrectly labelled data" (SPEC 5.3): every image unchanged, labelled with the
    source model's prediction; with ``only_wrong`` the training set is only the images the source gets wrong,
    each with its wrong label (statistic ``wrong``). A model that learns the true task from them has distilled
    the source from its errors alone."""

    name = "relabel_by_prediction"
    source_count = (1, 1)

    def __init__(self, only_wrong: bool = True, moments_of: str | None = None) -> None:
        """
        Args:
            only_wrong: train only on the images the source misclassifies (Wallace's CIFAR-10 experiment);
                false: on every image with the source's label (his MNIST -> Fashion-MNIST one).
            moments_of: ``mnist``: before labelling, shift and scale the images (all of them alike) to MNIST's
                pixel mean and standard deviation (their own measured over the whole training set); the
                constructed set holds the rescaled images. None: the images as they are.
        """
        if moments_of not in (None, *PIXEL_MOMENTS):
            raise ConfigError(f"unknown moments_of {moments_of!r}; choose one of {[None, *PIXEL_MOMENTS]}")
        self.moments_of = moments_of
        self.keep = "wrong" if only_wrong else None
        self._config = {"only_wrong": only_wrong, **({"moments_of": moments_of} if moments_of else {})}
        self._pool_moments: tuple[tuple, tuple[float, float]] | None = None

    def pool_moments(self, pool: Tensor) -> tuple[float, float]:
        """Pixel mean and standard deviation of the whole training set being constructed (computed once)."""
        tag = (pool.data_ptr(), tuple(pool.shape))
        if self._pool_moments is None or self._pool_moments[0] != tag:
            values = torch.cat([as_float_images(part).flatten().double() for part in pool.split(4096)])
            self._pool_moments = tag, (values.mean().item(), values.std().item())
        return self._pool_moments[1]

    def __call__(self, sources: Sequence[nn.Module], batch: Batch) -> RecipeOutput:
        model = self._single(sources)
        x = batch.x.clone()
        if self.moments_of is not None:
            (mean, std), (to_mean, to_std) = self.pool_moments(batch.pool), PIXEL_MOMENTS[self.moments_of]
            x = (x - mean) / std * to_std + to_mean
        with torch.no_grad(), autocast(batch, x.device):
            logits = model(x).float()
        prediction = logits.argmax(1)
        stats = {"wrong": (prediction != batch.y).float(),
                 "confidence": logits.softmax(1).amax(1)}  # how sure the source is of the label it gives
        return RecipeOutput(x, prediction, stats)
