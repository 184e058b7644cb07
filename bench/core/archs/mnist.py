"""MNIST architectures: the PixelDP paper's strided CNN and the Madry et al. CNN with max-pooling."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from bench.core.models import ImageClassifier, Normalize, cnn_small
from bench.core.registry import MODELS

__all__ = ["MNIST_SHAPE", "madry_mnist_cnn", "mnist_cnn"]

MNIST_SHAPE = (1, 28, 28)


@MODELS.register("mnist_cnn", shape=MNIST_SHAPE, classes=10)
def mnist_cnn(shape: Sequence[int], classes: int, *, width: int = 32, hidden: int = 1024) -> ImageClassifier:
    """The PixelDP MNIST CNN: conv 5x5x32 /2 -> conv 5x5x64 /2 -> FC 1024 -> FC classes (~3.3M parameters).

    Lecuyer et al. 2019, Sec. IV-A; `width` and `hidden` shrink it (`cnn_small` is the smoke variant).
    """
    return cnn_small(shape, classes, width=width, hidden=hidden)


@MODELS.register("madry_mnist_cnn", shape=MNIST_SHAPE, classes=10)
def madry_mnist_cnn(shape: Sequence[int], classes: int, *, channels: Sequence[int] = (32, 64),
                    hidden: int = 1024) -> ImageClassifier:
    """Madry et al. 2018's MNIST CNN: conv 5x5x32 - maxpool 2 - conv 5x5x64 - maxpool 2 - FC 1024 - FC classes.

    The first conv has no bias (the stem contract: its weights alone set the noise layer's
    sensitivity); otherwise as in MadryLab's mnist_challenge (~3.3M parameters).
    """
    in_channels, height, width = shape
    first, second = channels
    stem = nn.Conv2d(in_channels, first, 5, padding=2, bias=False)
    body = nn.Sequential(
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(first, second, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(second * (height // 4) * (width // 4), hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
    # Identity normalization: the stem's sensitivity in pixel units is its weights' norm.
    return ImageClassifier(Normalize([0.0] * in_channels, [1.0] * in_channels), stem, body)
