"""Wong-Kolter small and large conv nets (strided convs, no pooling), and the net of their released models."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from bench.core.models import ImageClassifier, Normalize
from bench.core.registry import MODELS

# CIFAR-10 channel statistics used by Wong et al. (2018); single-channel inputs stay unnormalized.
CIFAR_MEAN, CIFAR_STD = (0.485, 0.456, 0.406), (0.225, 0.225, 0.225)


def _normalize(channels: int) -> Normalize:
    if channels == 3:
        return Normalize(CIFAR_MEAN, CIFAR_STD)
    return Normalize([0.0] * channels, [1.0] * channels)


def _after_convs(size: int, strides: int) -> int:
    """Spatial size after `strides` stride-2 convs with kernel 4 and padding 1 (floor halving)."""
    for _ in range(strides):
        size = (size - 2) // 2 + 1
    return size


@MODELS.register("wk_small")
def wk_small(shape: Sequence[int], classes: int, *, width: int = 16, hidden: int = 100) -> ImageClassifier:
    """conv width(4, s2, p1) -> conv 2 width(4, s2, p1) -> FC hidden -> FC classes, ReLUs between.

    The small MNIST / CIFAR model of Wong & Kolter (2018) and Wong et al. (2018), "Scaling
    provable adversarial defenses", Sec. 5; the stem has no bias (harness convention).
    """
    channels, height, width_px = shape
    stem = nn.Conv2d(channels, width, 4, stride=2, padding=1, bias=False)
    flat = 2 * width * _after_convs(height, 2) * _after_convs(width_px, 2)
    body = nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
    return ImageClassifier(_normalize(channels), stem, body)


@MODELS.register("wk_large")
def wk_large(shape: Sequence[int], classes: int, *, width: int = 32, hidden: int = 512) -> ImageClassifier:
    """conv w(3,s1) -> conv w(4,s2) -> conv 2w(3,s1) -> conv 2w(4,s2) -> FC hidden -> FC hidden -> FC.

    The large model of Wong et al. (2018), "Scaling provable adversarial defenses", Sec. 5.
    """
    channels, height, width_px = shape
    stem = nn.Conv2d(channels, width, 3, stride=1, padding=1, bias=False)
    flat = 2 * width * _after_convs(height, 2) * _after_convs(width_px, 2)
    body = nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(width, width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
    return ImageClassifier(_normalize(channels), stem, body)


def wong2018_net(channels: int = 1, size: int = 28, classes: int = 10) -> nn.Sequential:
    """The network of Wong & Kolter's released models (ICML 2018): [0,1] images (N, C, size, size) -> logits.

    Their examples/problems.py `mnist_model` (channels 1, size 28) and `svhn_model` (3, 32): conv 16
    (4, s2, p1) -> conv 32 (4, s2, p1) -> FC 100 -> FC classes with ReLUs between, a bias in every
    layer and no input normalization. Unlike `wk_small` (no stem bias; CIFAR statistics for three
    channels) it loads their checkpoints as they are: the Sequential's indices are their keys
    (0.*, 2.*, 5.*, 7.*; the Flatten sits at 4).
    """
    flat = 32 * _after_convs(size, 2) ** 2
    return nn.Sequential(
        nn.Conv2d(channels, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(flat, 100), nn.ReLU(), nn.Linear(100, classes))
