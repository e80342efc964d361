"""BatchNorm folded into the convolutions of an eval-mode network: the same function with fewer passes over
memory, for the attacks, which only ever see the network in eval mode.

In eval mode a BatchNorm2d is a per-channel affine map ``y = s * x + t`` with ``s = gamma / sqrt(var + eps)``;
after a convolution it folds into the convolution's weights and bias. The fast CNN puts a max-pool between the
two (conv, max-pool, BN): max-pooling commutes with a per-channel affine map whose scale is positive, so that BN
folds too when every ``s > 0`` and stays otherwise.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _positive_scale(bn: nn.BatchNorm2d) -> bool:
    scale = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    return bool((scale > 0).all())


def _foldable(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_var is not None


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` in which every BatchNorm2d that follows a Conv2d in an ``nn.Sequential``
    (directly, or across a MaxPool2d when its scales are all positive) is folded into it and replaced by an
    ``nn.Identity``; and how many were folded. ``model`` itself is left as it is."""
    folded_model = copy.deepcopy(model).eval()
    folded = 0
    for sequential in [m for m in folded_model.modules() if isinstance(m, nn.Sequential)]:
        layers = list(sequential)
        for i, layer in enumerate(layers):
            if not _foldable(layer):
                continue
            if i >= 1 and isinstance(layers[i - 1], nn.Conv2d):
                conv_at = i - 1
            elif (i >= 2 and isinstance(layers[i - 1], nn.MaxPool2d) and isinstance(layers[i - 2], nn.Conv2d)
                  and _positive_scale(layer)):
                conv_at = i - 2
            else:
                continue
            sequential[conv_at] = fuse_conv_bn_eval(layers[conv_at], layer)
            sequential[i] = nn.Identity()
            layers = list(sequential)
            folded += 1
    return folded_model, folded


def as_attacked(model: nn.Module, *, fold: bool, channels_last: bool) -> nn.Module:
    """The network as the eval-mode attacks run it (generation, the accuracy-under-attack sweeps): BatchNorm folded
    into a copy when ``fold`` (``model`` itself is then left as it is), then in channels_last when asked, after the
    folding, whose new convolution weights are contiguous."""
    if fold:
        model = fold_batchnorm(model)[0]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
