"""Fourier-basis noise (Yin et al., "A Fourier Perspective on Model Robustness"; SPEC 5.4): the error of a model when
one 2-D Fourier basis image of a fixed L2 norm is added to every test image, for each frequency of the grid.

The basis image of frequency ``(u, v)`` (centred: -H/2 .. H/2 - 1) is the real inverse FFT of a spectrum that is 1
at ``(u, v)`` and at its mirror ``(-u, -v)``, scaled to unit L2 norm; ``(u, v)`` and ``(-u, -v)`` give the same
image, so only one of each pair is evaluated and the map is filled symmetrically. As Yin et al.: each image and
each colour channel gets its own random sign, every channel a perturbation of L2 norm ``norm``, and the result is
clipped to [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn


def basis_image(u: int, v: int, size: int = 32) -> torch.Tensor:
    """The unit-L2-norm real Fourier basis image ``[size, size]`` of centred frequency ``(u, v)``."""
    spectrum = torch.zeros(size, size, dtype=torch.complex128)
    spectrum[u % size, v % size] = 1
    spectrum[-u % size, -v % size] = 1
    image = torch.fft.ifft2(spectrum).real
    return image / image.norm()


def frequencies(size: int = 32) -> list[tuple[int, int]]:
    """Every centred frequency of a ``size`` x ``size`` grid, one of each mirrored pair (the first met)."""
    seen, kept = set(), []
    for u in range(-size // 2, size // 2):
        for v in range(-size // 2, size // 2):
            mirror = ((-u + size // 2) % size - size // 2, (-v + size // 2) % size - size // 2)
            if mirror not in seen:
                seen.add((u, v))
                kept.append((u, v))
    return kept


@torch.no_grad()
def fourier_error_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: float = 4.0, seed: int = 0,
                      batch_size: int = 500) -> torch.Tensor:
    """The error rate ``[H, W]`` of ``model`` (eval mode, on ``x``'s device) on images ``x`` ``[N, C, H, W]`` in
    [0, 1] perturbed by each Fourier basis image of L2 norm ``norm``; entry ``[u + H/2, v + W/2]`` is frequency
    ``(u, v)``, the centre the lowest frequency. Signs come from a generator seeded with ``seed``."""
    n, channels, size, width = x.shape
    if size != width:
        raise ValueError(f"square images only, got {size} x {width}")
    generator = torch.Generator().manual_seed(seed)
    errors = torch.zeros(size, size, dtype=torch.float64)
    for u, v in frequencies(size):
        signs = torch.randint(0, 2, (n, channels, 1, 1), generator=generator).to(x) * 2 - 1
        noise = norm * basis_image(u, v, size).to(x)
        wrong = 0
        for start in range(0, n, batch_size):
            part = slice(start, start + batch_size)
            perturbed = (x[part] + signs[part] * noise).clamp(0, 1)
            wrong += int((model(perturbed).argmax(1) != y[part]).sum())
        errors[u + size // 2, v + size // 2] = wrong / n
        errors[(-u + size // 2) % size, (-v + size // 2) % size] = wrong / n  # the mirror: the same image
    return errors


def band_error(errors: torch.Tensor, low: int | None = None, high: int | None = None) -> float:
    """The mean of an error map over the frequencies with ``low <= max(|u|, |v|) <= high`` (None: unbounded)."""
    size = errors.shape[0]
    centred = torch.arange(size) - size // 2
    radius = torch.maximum(centred.abs()[:, None], centred.abs()[None, :])
    keep = torch.ones_like(radius, dtype=torch.bool)
    if low is not None:
        keep &= radius >= low
    if high is not None:
        keep &= radius <= high
    return errors[keep].mean().item()
