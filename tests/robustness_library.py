"""Files in the exact format of the MadryLab ``robustness`` library, for tests: its CIFAR ResNet (written out here
as the library writes it, not the suite's), wrapped as its AttackerModel (normalizer, model, attacker.model)
inside DataParallel, saved with ``pickle_module=dill`` as its train.py saves it."""

from __future__ import annotations

import os
from pathlib import Path

import dill
import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class LibraryBottleneck(nn.Module):  # robustness/cifar_models/resnet.py
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, self.expansion * planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(self.expansion * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class LibraryBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class LibraryResNet(nn.Module):
    def __init__(self, block, num_blocks) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.linear = nn.Linear(512 * block.expansion, 10)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


class InputNormalize(nn.Module):
    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("new_mean", torch.tensor(mean)[..., None, None])
        self.register_buffer("new_std", torch.tensor(std)[..., None, None])

    def forward(self, x):
        return (torch.clamp(x, 0, 1) - self.new_mean) / self.new_std


class Attacker(nn.Module):
    def __init__(self, model, mean, std) -> None:
        super().__init__()
        self.normalize = InputNormalize(mean, std)
        self.model = model


class AttackerModel(nn.Module):
    def __init__(self, model, mean=MEAN, std=STD) -> None:
        super().__init__()
        self.normalizer = InputNormalize(mean, std)
        self.model = model
        self.attacker = Attacker(model, mean, std)

    def forward(self, x):
        return self.model(self.normalizer(x))


class DataParallelKeys(nn.Module):  # nn.DataParallel's "module." prefix, without needing devices
    def __init__(self, module) -> None:
        super().__init__()
        self.module = module


def library_file(path: Path, network: nn.Module, mean=MEAN, **extra) -> AttackerModel:
    """A checkpoint as robustness/train.py saves it."""
    torch.manual_seed(0)
    for m in network.modules():  # non-trivial BatchNorm statistics, so a mix-up of buffers shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    wrapped = AttackerModel(network, mean=mean)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.1 ** (epoch // 50))
    torch.save({"model": DataParallelKeys(wrapped).state_dict(), "optimizer": opt.state_dict(),
                "schedule": schedule.state_dict(), "epoch": 150, **extra}, path, pickle_module=dill)
    return wrapped.eval()


def resnet50() -> LibraryResNet:
    return LibraryResNet(LibraryBottleneck, (3, 4, 6, 3))


def resnet18() -> LibraryResNet:
    return LibraryResNet(LibraryBasicBlock, (2, 2, 2, 2))


class Payload:
    """An object whose unpickling runs a shell command that touches MARKER."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp") / f"bof-madrylab-payload-{os.getpid()}"
