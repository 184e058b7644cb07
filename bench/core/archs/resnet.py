"""Wide ResNets (Zagoruyko & Komodakis 2016) for SVHN and CIFAR: WRN-28-10 and a small variant."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.models import ImageClassifier, Normalize
from bench.core.registry import MODELS

__all__ = ["CIFAR_SHAPE", "PreActBlock", "WideResNetBody", "resnet_small", "wide_resnet"]

CIFAR_SHAPE = (3, 32, 32)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity (or strided 1x1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut reads the pre-activated input, as in the reference WRN.
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + skip


class WideResNetBody(nn.Module):
    """Everything after the 16-filter stem: 3 groups of blocks (strides 1, 2, 2), BN-ReLU, global pool, FC."""

    def __init__(self, depth: int, width: int, classes: int, dropout: float):
        super().__init__()
        blocks = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        layers = []
        for group in range(3):
            for i in range(blocks):
                layers.append(PreActBlock(channels[group] if i == 0 else channels[group + 1], channels[group + 1],
                                          stride=(1 if group == 0 else 2) if i == 0 else 1, dropout=dropout))
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(h)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@MODELS.register("wide_resnet", shape=CIFAR_SHAPE, classes=10)
def wide_resnet(shape: Sequence[int], classes: int, *, depth: int = 28, width: int = 10,
                dropout: float = 0.0) -> ImageClassifier:
    """WRN-depth-width: conv3x3x16 stem, 3 groups of (depth-4)/6 pre-activation blocks, global average pool.

    WRN-28-10 (~36.5M parameters) is the PixelDP paper's SVHN/CIFAR model (Lecuyer et al. 2019,
    Sec. IV-A) and Madry et al.'s CIFAR-10 model. The stem is the first conv (no bias); the body
    starts with batch norm and ReLU, so the noise layer sits between conv and ReLU.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"Wide ResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
    if width < 1:
        raise ValueError(f"Wide ResNet width must be >= 1, got {width}")
    channels = shape[0]
    stem = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
    # Pixels shifted to [-0.5, 0.5] like the original PixelDP code; no scaling, so the stem's
    # sensitivity in pixel units is its weights' norm.
    return ImageClassifier(Normalize([0.5] * channels, [1.0] * channels), stem,
                           WideResNetBody(depth, width, classes, dropout))


@MODELS.register("resnet_small", shape=CIFAR_SHAPE, classes=10)
def resnet_small(shape: Sequence[int], classes: int, *, depth: int = 16, width: int = 2,
                 dropout: float = 0.0) -> ImageClassifier:
    """A cheap residual net for CPU profiles: WRN-16-2 by default (~0.7M parameters)."""
    return wide_resnet(shape, classes, depth=depth, width=width, dropout=dropout)
