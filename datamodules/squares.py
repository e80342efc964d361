"""Nakkiran's "adversarial squares" (Distill 2019; SPEC section 4.3): a distribution with no non-robust features.

``Y`` is uniform in {-1, +1}; the image is ``X = (Y + u) * s`` with pixel noise ``u ~ Uniform([-a, a]^d)`` and a
whole-image sign flip ``s = -1`` with probability ``p`` (label noise). Every pixel has the sign of ``Y * s`` and
magnitude in [1 - a, 1 + a], so the linear classifier ``sign(mean of the pixels)`` is right on every unflipped
image and robust up to Linf ``1 - a`` (0.9). A network that memorises the flipped training images is not.

Images are floats in [-1 - a, 1 + a], not [0, 1]: attack them with ``bounds=None``. The model's normalisation
layer should be mean 0, std 1 (``mean: [0, 0, 0]``, ``std: [1, 1, 1]``). Labels are 0 for ``Y = -1`` and 1 for
``Y = +1`` (the clean label, before the flip), for the cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.errors import ConfigError
from datamodules.base import InMemoryDataModule

# Offsets of the train and test streams from the seed: the test set does not depend on train_size.
_TRAIN_STREAM, _TEST_STREAM = 0, 1


def make_squares(
    n: int, *, input_noise: float = 0.1, flip_prob: float = 0.1, image_shape: Sequence[int] = (3, 32, 32),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` samples of the squares distribution: ``(x float32 [n, *image_shape], y long [n] in {0, 1},
    flipped bool [n])``, where ``flipped`` marks the images whose sign was flipped (label noise)."""
    check_squares_args(input_noise, flip_prob, image_shape)
    if n < 0:
        raise ConfigError(f"cannot generate {n} samples; the size must be >= 0")
    y = torch.randint(0, 2, (n,), generator=generator)
    sign = (2 * y - 1).float()  # Y in {-1, +1}
    noise = (torch.rand(n, *image_shape, generator=generator) * 2 - 1) * input_noise
    flipped = torch.rand(n, generator=generator) < flip_prob
    s = torch.where(flipped, -1.0, 1.0)
    x = (sign.view(-1, *[1] * len(image_shape)) + noise) * s.view(-1, *[1] * len(image_shape))
    return x, y, flipped


def check_squares_args(input_noise: float, flip_prob: float, image_shape: Sequence[int]) -> None:
    """Raise a ValueError naming the invalid parameter of the squares distribution and its valid range."""
    if not 0 <= input_noise < 1:
        raise ConfigError(f"input_noise must be in [0, 1) so the two classes stay apart, got {input_noise}")
    if not 0 <= flip_prob < 0.5:
        raise ConfigError(f"flip_prob must be in [0, 0.5) (0.5 makes the label independent of X), got {flip_prob}")
    if len(image_shape) == 0 or any(int(d) < 1 for d in image_shape):
        raise ConfigError(f"image_shape must be positive sizes such as [3, 32, 32], got {list(image_shape)}")


class SquaresDataModule(InMemoryDataModule):
    """Adversarial squares (SPEC 4.3), generated in memory from ``seed``: same seed, same data."""

    num_classes = 2

    def __init__(
        self,
        train_size: int = 10_000,
        test_size: int = 2000,
        input_noise: float = 0.1,
        flip_prob: float = 0.1,
        image_shape: Sequence[int] = (3, 32, 32),
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 0,
        seed: int = 0,
        augment: bool = False,
        **kwargs,
    ) -> None:
        """
        Args:
            train_size: number of training samples generated (the spec: 10,000).
            test_size: number of test samples, drawn independently of the training set and of ``train_size``.
            input_noise: half-width ``a`` of the uniform pixel noise: pixels have magnitude in [1 - a, 1 + a].
            flip_prob: probability that a whole image is sign-flipped while its label is kept (label noise).
            image_shape: shape of one image, ``[channels, height, width]``.
            batch_size: training batch size per device.
            eval_batch_size: validation/test batch size per device (default: ``batch_size``).
            val_size: hold out this many training samples for validation; 0 validates on the test set.
            seed: seed of the generated data (train and test) and of the shuffling.
            augment: random crop and flip of training batches; off by default because the crop's zero padding
                is not part of the distribution.
        """
        check_squares_args(input_noise, flip_prob, image_shape)
        if train_size < 1 or test_size < 1:
            raise ConfigError(f"train_size and test_size must be >= 1, got {train_size} and {test_size}")
        # train_size means "generate this many" here, not the base class's "subset of a fixed set".
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, val_size=val_size, seed=seed,
                         augment=augment, train_size=None, **kwargs)
        self.generated_train_size, self.test_size = train_size, test_size
        self.input_noise, self.flip_prob, self.image_shape = input_noise, flip_prob, tuple(int(d) for d in image_shape)

    def _generate(self, n: int, stream: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + stream)
        return make_squares(n, input_noise=self.input_noise, flip_prob=self.flip_prob, image_shape=self.image_shape,
                            generator=gen)

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        train_x, train_y, self._all_train_flipped = self._generate(self.generated_train_size, _TRAIN_STREAM)
        test_x, test_y, self.test_flipped = self._generate(self.test_size, _TEST_STREAM)
        return train_x, train_y, test_x, test_y

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        # Which images carry label noise, aligned with self.train / self.test (the callback reports on them).
        self.train_flipped = self._all_train_flipped[self.train_indices]

    @property
    def linear_radius_bound(self) -> float:
        """Every pixel keeps its sign under Linf perturbations below ``1 - input_noise``: the guaranteed radius
        of ``sign(mean of the pixels)`` (actual radii are ``|mean(x)|``, about 1)."""
        return 1.0 - self.input_noise
