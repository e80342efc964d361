"""The networks of the suite. Each takes images in their own pixel range, normalises inside (so epsilons are
in pixel units), returns logits from ``forward`` and the penultimate representation from ``features``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

from common.datasets import CIFAR10_MEAN as CIFAR_MEAN
from common.datasets import CIFAR10_STD as CIFAR_STD
from common.errors import ConfigError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as a layer of the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Normalisation + a representation network ``body`` + a linear ``head``."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int, mean, std) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation g(x), used to build D_R / D_NR."""
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def fit_whitening(self, images: torch.Tensor) -> bool:
        """Initialise every unfitted :class:`PatchWhitening` layer from training images in pixel units;
        returns whether there was one to fit."""
        layers = [m for m in self.modules() if isinstance(m, PatchWhitening) and not bool(m.fitted)]
        for layer in layers:
            layer.fit(self.normalize(images.to(layer.conv.weight.device)))
        return bool(layers)


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(*conv_bn(c_in, width, 3, stride), nn.ReLU(inplace=True), *conv_bn(width, width))
        self.shortcut = self._shortcut(c_in, width * self.expansion, stride)

    @staticmethod
    def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
        return nn.Sequential(*conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        nn.Module.__init__(self)
        self.residual = nn.Sequential(
            *conv_bn(c_in, width, 1), nn.ReLU(inplace=True),
            *conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
            *conv_bn(width, width * 4, 1),
        )
        self.shortcut = self._shortcut(c_in, width * 4, stride)


def cifar_resnet_body(block: type[BasicBlock], depths: Sequence[int], in_channels: int) -> tuple[nn.Module, int]:
    """The CIFAR ResNet of the robustness library: 3x3 stride-1 stem, no max-pool, widths 64/128/256/512."""
    layers: list[nn.Module] = [*conv_bn(in_channels, 64), nn.ReLU(inplace=True)]
    c_in = 64
    for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
        for i in range(depth):
            layers.append(block(c_in, width, stride=2 if stage > 0 and i == 0 else 1))
            c_in = width * block.expansion
    # The library's 4x4 average pool on 32x32 inputs; adaptive so other sizes (MNIST) also work.
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


def vgg16_body(in_channels: int) -> tuple[nn.Module, int]:
    """VGG-16 with batch norm, CIFAR variant (one 512-d linear head)."""
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    c_in = in_channels
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [*conv_bn(c_in, item), nn.ReLU(inplace=True)]
            c_in = item
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 512


class PatchWhitening(nn.Module):
    """Airbench's frozen first layer: a 2x2 conv whose filters are the +/- eigenvectors of the training set's
    2x2-patch covariance scaled by 1/sqrt(eigenvalue + eps), followed by GELU. It amplifies the low-variance
    (high-frequency) directions of natural images, which speeds up training and makes the network rely more on
    exactly the small-norm features Ilyas et al. call non-robust. Initialise with :meth:`fit` on (normalised)
    training images; the weights are buffers-like frozen parameters saved in checkpoints."""

    def __init__(self, in_channels: int, eps: float = 5e-4) -> None:
        super().__init__()
        if not eps > 0:  # eps 0 divides by the zero eigenvalues of flat patches
            raise ConfigError(f"PatchWhitening: whiten_eps must be > 0, got {eps!r}; airbench uses 5e-4")
        self.conv = nn.Conv2d(in_channels, 2 * in_channels * 4, 2, padding=0, bias=False)
        self.conv.weight.requires_grad_(False)
        self.eps = eps
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set the filters from images ``x`` [N, C, H, W] (already normalised as the model sees them)."""
        c = x.shape[1]
        patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = (eigenvectors.T / (eigenvalues.clamp_min(0) + self.eps).sqrt()[:, None]).float()
        filters = filters.flip(0).reshape(c * 4, c, 2, 2)
        self.conv.weight.copy_(torch.cat([filters, -filters]).to(self.conv.weight))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.fitted):
            raise RuntimeError("PatchWhitening was never fitted: call model.fit_whitening(train_images) before "
                               "training (ClassifierModule does it at the start of fit)")
        # fp32 under any autocast: the gains (up to 1/sqrt(eps), 45x) would amplify bf16's rounding of the input in
        # exactly the faint directions the constructed datasets plant (docs/NUMERICS.md). 1.4% of the fast CNN's
        # FLOPs; under 32-true nothing changes.
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.gelu(self.conv(x.float()))


def fast_cnn_body(in_channels: int, widths: Sequence[int] = (32, 64, 128), pool: str = "max",
                  whiten: bool = False, whiten_eps: float = 5e-4) -> tuple[nn.Module, int]:
    """A small fast CNN for CPU work, after airbench: each stage is conv, max-pool, BN, GELU, conv, BN, GELU,
    then a global ``pool`` ("max" or "avg") over the last map. ``whiten`` prepends airbench's frozen 2x2
    patch-whitening layer (:class:`PatchWhitening`) with regulariser ``whiten_eps``: airbench's 5e-4 amplifies the
    low-variance directions most; larger values amplify them less (1.0 nearly flattens the layer's gains).

    No learned stem: normalising/activating full-resolution maps costs more than it gives on a CPU.
    """
    if pool not in ("max", "avg"):
        raise ConfigError(f"fast_cnn pool must be 'max' or 'avg', got {pool!r}")
    layers: list[nn.Module] = []
    c_in = in_channels
    if whiten:
        layers.append(PatchWhitening(in_channels, eps=whiten_eps))
        c_in = 8 * in_channels
    for width in widths:
        layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(width),
                   nn.GELU(), *conv_bn(width, width), nn.GELU()]
        c_in = width
    layers += [nn.AdaptiveMaxPool2d(1) if pool == "max" else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


def simple_cnn_body(in_channels: int) -> tuple[nn.Module, int]:
    """The "simple CNN" of PyTorch's MNIST example (pytorch/examples, mnist/main.py): conv 32, conv 64 (3 x 3,
    ReLU), max-pool to 12 x 12 (on 28 x 28 images exactly the example's 2 x 2 pool; adaptive so that any image
    size works), dropout 0.25, a 128-unit ReLU layer, dropout 0.5. No BatchNorm: its eval-mode statistics are those
    of the training images, which shifts every layer on images of another dataset (Wallace's MNIST model
    labelling Fashion-MNIST)."""
    body = nn.Sequential(nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.AdaptiveMaxPool2d(12), nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * 12 * 12, 128),
                         nn.ReLU(), nn.Dropout(0.5))
    return body, 128


def resnet18_body(in_channels: int) -> tuple[nn.Module, int]:
    """ResNet-18 (CIFAR variant, :func:`cifar_resnet_body`); it takes no ``arch_kwargs``."""
    return cifar_resnet_body(BasicBlock, (2, 2, 2, 2), in_channels)


def resnet50_body(in_channels: int) -> tuple[nn.Module, int]:
    """ResNet-50 (CIFAR variant, :func:`cifar_resnet_body`); it takes no ``arch_kwargs``."""
    return cifar_resnet_body(Bottleneck, (3, 4, 6, 3), in_channels)


def linear_body(in_channels: int, image_size: int = 32) -> tuple[nn.Module, int]:
    """No hidden layer: the head sees the normalised pixels, so the classifier is linear in the image (Goh's
    robust linear features, models/linear.py). ``image_size``: the side of the square input images."""
    return nn.Flatten(), in_channels * image_size * image_size


# name -> body builder ``(in_channels, **arch_kwargs) -> (body, feature_dim)``. Each builder's signature lists
# exactly the arch_kwargs it accepts (no **kwargs), so build_model can refuse the others instead of ignoring them.
ARCHITECTURES: dict[str, Callable[..., tuple[nn.Module, int]]] = {
    "resnet18": resnet18_body,
    "resnet50": resnet50_body,
    "vgg16": vgg16_body,
    "fast_cnn": fast_cnn_body,
    "simple_cnn": simple_cnn_body,
    "linear": linear_body,
}


def arch_kwargs_of(arch: str) -> tuple[str, ...]:
    """The ``arch_kwargs`` architecture ``arch`` accepts: its builder's parameters after ``in_channels``."""
    return tuple(list(inspect.signature(ARCHITECTURES[arch]).parameters)[1:])


def check_arch_kwargs(arch: str, arch_kwargs: dict) -> None:
    """Refuse ``arch_kwargs`` that ``arch`` does not take, naming them, the accepted ones and a close match."""
    accepted = arch_kwargs_of(arch)
    unknown = sorted(set(arch_kwargs) - set(accepted), key=str)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), accepted, n=1)
        owners = [other for other in ARCHITECTURES if other != arch and key in arch_kwargs_of(other)]
        if close:
            hints.append(f"{key!r}: did you mean {close[0]!r}")
        elif owners:
            hints.append(f"{key!r} is an option of {' and '.join(owners)}, not of {arch}")
    takes = f"accepts only {', '.join(accepted)}" if accepted else "takes no arch_kwargs"
    fix = f"fix model.init_args.arch_kwargs: remove {unknown}" + (f" (accepted: {list(accepted)})" if accepted else "")
    raise ConfigError("; ".join([f"arch_kwargs {unknown} are not options of architecture {arch!r}, which {takes}",
                                 *hints, fix]))


def build_model(arch: str, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] = CIFAR_MEAN,
                std: Sequence[float] = CIFAR_STD, **arch_kwargs) -> Classifier:
    """A classifier by name: one of ``ARCHITECTURES``; ``arch_kwargs`` must be options of that architecture
    (:func:`arch_kwargs_of`), anything else is refused rather than ignored."""
    if arch not in ARCHITECTURES:
        close = difflib.get_close_matches(str(arch), ARCHITECTURES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown architecture {arch!r}; {hint}choose one of {sorted(ARCHITECTURES)}; fix "
                          "model.init_args.arch")
    check_arch_kwargs(arch, arch_kwargs)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigError(f"mean/std need {in_channels} values (one per input channel), got {len(mean)}/{len(std)}")
    body, dim = ARCHITECTURES[arch](in_channels, **arch_kwargs)
    return Classifier(body, dim, num_classes, mean, std)
