"""Two low-frequency corruptions of CIFAR-10-C (Hendrycks & Dietterich), at CIFAR-10-C's own parameters, in torch:
``fog`` and ``contrast`` (SPEC 5.4). The suite's own implementation of the published procedure
(``make_cifar_c.py`` of hendrycks/robustness), checked in tests against values computed by hand:

- contrast, severity s: each channel pulled towards its own spatial mean by ``c_s`` (0.75, 0.5, 0.4, 0.3, 0.15).
- fog, severity s with ``(t_s, d_s)`` = (0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75): add ``t_s`` times a
  32 x 32 plasma fractal (diamond-square, wibble decay ``d_s``, the same map on every channel), then rescale by
  ``m / (m + t_s)`` with ``m`` the image's largest value.
- both then clipped to [0, 1] and stored as uint8 the way CIFAR-10-C was (``np.uint8`` truncates: floor).

CIFAR-10-C drew its fractals from numpy's global random state; here each image's fractal comes from its own
generator (seed, index), so a corrupted test set is the same on every run, though not CIFAR-10-C's bytes: users
who have the CIFAR-10-C files load them instead (``datamodules.CIFAR10CDataModule``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))


def check_severity(severity: int) -> None:
    if isinstance(severity, bool) or severity not in range(1, 6):
        raise ValueError(f"severity must be 1..5, got {severity!r}")


def as_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] and keep only what a uint8 image holds, truncating as ``np.uint8(x * 255)`` does."""
    return torch.floor(x.clamp(0, 1) * 255) / 255


def contrast(x: torch.Tensor, severity: int, seed: int = 0, indices: Sequence[int] | None = None) -> torch.Tensor:
    """CIFAR-10-C's contrast of images ``[N, C, H, W]`` in [0, 1] (deterministic: ``seed``, ``indices`` unused)."""
    check_severity(severity)
    means = x.mean(dim=(2, 3), keepdim=True)
    return as_uint8_levels((x - means) * CONTRAST[severity - 1] + means)


def plasma_fractal(size: int = 32, wibble_decay: float = 3.0, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """A ``size`` x ``size`` height map in [0, 1] by the diamond-square algorithm on a torus, as CIFAR-10-C's:
    each square's centre is the mean of its corners plus noise, then each diamond's, the noise's scale shrinking by
    ``wibble_decay`` per level (CIFAR-10-C's noise is ``w * U(-w, w)`` with w = 100 at the first level)."""
    if size < 2 or size & (size - 1):
        raise ValueError(f"size must be a power of two, got {size}")
    height = torch.zeros(size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def mean_plus_noise(total: torch.Tensor) -> torch.Tensor:  # total: the sum of four neighbours
        noise = torch.rand(total.shape, generator=generator, dtype=torch.float64) * 2 * wibble - wibble
        return total / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = height[0::step, 0::step]
        squares = corners + corners.roll(-1, 0)
        squares = squares + squares.roll(-1, 1)
        height[half::step, half::step] = mean_plus_noise(squares)
        centres = height[half::step, half::step]
        corners = height[0::step, 0::step]
        height[0::step, half::step] = mean_plus_noise(centres + centres.roll(1, 0) + corners + corners.roll(-1, 1))
        height[half::step, 0::step] = mean_plus_noise(centres + centres.roll(1, 1) + corners + corners.roll(-1, 0))
        step, wibble = half, wibble / wibble_decay
    height -= height.min()
    return height / height.max()


def image_generator(seed: int, index: int) -> torch.Generator:
    """The private random stream of one image's corruption."""
    digest = hashlib.sha256(f"corruption:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def fog(x: torch.Tensor, severity: int, seed: int = 0, indices: Sequence[int] | None = None,
        fractals: torch.Tensor | None = None) -> torch.Tensor:
    """CIFAR-10-C's fog of images ``[N, C, H, W]`` in [0, 1] (H = W = 32 as CIFAR-10-C; other sizes use a fractal
    of the next power of two, cropped). Image i's fractal comes from generator (``seed``, ``indices[i]``; default
    ``i``): pass each image's index in its dataset, and a set corrupted in batches, or only a subset of it, gets
    the images of the whole set corrupted at once. ``fractals`` ``[N, H, W]``: these height maps instead."""
    check_severity(severity)
    thickness, decay = FOG[severity - 1]
    n, _, h, w = x.shape
    if fractals is None:
        size = 1 << (max(h, w, 2) - 1).bit_length()  # the next power of two
        indices = range(n) if indices is None else indices
        if len(indices) != n:
            raise ValueError(f"{len(indices)} indices for {n} images")
        fractals = torch.stack([plasma_fractal(size, decay, image_generator(seed, int(i)))[:h, :w] for i in indices])
    brightest = x.flatten(1).amax(1)[:, None, None, None]
    fogged = x.double() + thickness * fractals[:, None].to(torch.float64)
    return as_uint8_levels(fogged * brightest / (brightest + thickness)).to(x.dtype)


CORRUPTIONS = {"fog": fog, "contrast": contrast}  # what the suite generates: (x, severity, seed, indices) -> x
