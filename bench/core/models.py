"""Model architectures; every model takes [0,1] images (N, C, H, W) and returns logits (N, classes).

All models are `ImageClassifier`s: normalize -> stem (the first conv, no bias) -> noise slot ->
body. A defense finds the first conv at `model.stem` (e.g. PixelDP's sensitivity control) and
puts a layer after it by assigning `model.noise`, without model-specific code.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from bench.core.precision import exact_float32
from bench.core.registry import MODELS

__all__ = ["ImageClassifier", "Normalize", "build_model", "cnn_small", "count_parameters"]


class Normalize(nn.Module):
    """Per-channel (x - mean) / std held as buffers, so models accept [0,1] pixels."""

    mean: torch.Tensor  # (1, C, 1, 1) buffer
    std: torch.Tensor  # (1, C, 1, 1) buffer

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """normalize -> stem -> noise -> body; `pre_noise` and `post_noise` expose the split.

    With a noise layer in place, `pre_noise` runs in IEEE float32 (no TF32, no autocast): the
    noise is calibrated to the stem's sensitivity, so the activations it is added to must be the
    ones the bound speaks about. The opt-in speed settings (bench.profile.speed) apply to the post-noise
    body only, or to the whole forward of a model without noise: `body_autocast` (a dtype, e.g.
    torch.bfloat16) and `body_channels_last`. They are plain attributes, not state: checkpoints
    are the same either way.
    """

    def __init__(self, normalize: nn.Module, stem: nn.Module, body: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.stem = stem
        self.noise: nn.Module = nn.Identity()
        self.body = body
        self.body_autocast: torch.dtype | None = None
        self.body_channels_last = False

    def has_noise(self) -> bool:
        """Whether a defense put a noise layer after the stem (PixelDP)."""
        return not isinstance(self.noise, nn.Identity)

    def pre_noise(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0,1] -> the stem's output, i.e. the activations the noise is added to."""
        if not self.has_noise():
            return self.stem(self.normalize(x))
        with exact_float32(), torch.autocast(x.device.type, enabled=False):
            return self.stem(self.normalize(x))

    def post_noise(self, h: torch.Tensor) -> torch.Tensor:
        """Stem activations (already noised) -> logits (N, classes), float32 under the speed settings."""
        return self._fast(self.body, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_noise() and (self.body_autocast is not None or self.body_channels_last):
            # Nothing is calibrated to the stem's output: the whole network may run fast.
            return self._fast(lambda images: self.body(self.stem(self.normalize(images))), x)
        return self.post_noise(self.noise(self.pre_noise(x)))

    def _fast(self, fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        """fn(h) under the speed settings; the output comes back in float32 (losses and attacks stay exact)."""
        if self.body_channels_last and h.dim() == 4:
            h = h.contiguous(memory_format=torch.channels_last)
        if self.body_autocast is None:
            return fn(h)
        with torch.autocast(h.device.type, dtype=self.body_autocast):
            return fn(h).float()


def _mnist_norm(channels: int) -> Normalize:
    # Identity normalization keeps the pre-noise layer's sensitivity equal to its weights' norm.
    return Normalize([0.0] * channels, [1.0] * channels)


@MODELS.register("cnn_small")
def cnn_small(shape: Sequence[int], classes: int, *, width: int = 32, hidden: int = 128) -> ImageClassifier:
    """Smoke-profile CNN for 28x28 inputs: conv5x5/2 (width) -> conv5x5/2 (2 width) -> FC hidden -> FC.

    The paper's MNIST CNN has the same two strided convs with FC 1024 (Lecuyer et al. 2019, Sec. IV).
    """
    channels, height, width_px = shape
    stem = nn.Conv2d(channels, width, 5, stride=2, padding=2, bias=False)
    flat = 2 * width * ((height + 3) // 4) * ((width_px + 3) // 4)
    body = nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
    return ImageClassifier(_mnist_norm(channels), stem, body)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(arch: str, shape: Sequence[int], classes: int, **kwargs) -> ImageClassifier:
    """Instantiate a registered architecture for inputs of `shape` (C, H, W) and `classes` outputs."""
    return MODELS.get(arch)(shape, classes, **kwargs)

