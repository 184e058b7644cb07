"""Batched training augmentations on tensors: CIFAR's pad-and-crop with flips, and plain flips."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["horizontal_flip", "pad_crop_flip"]


def _draw(n: int, high: int, generator: torch.Generator | None) -> torch.Tensor:
    """n integers in [0, high) drawn on the generator's device (CPU when None)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, high, (n,), generator=generator, device=device)


def pad_crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, *, padding: int = 4) -> torch.Tensor:
    """Zero-pad by `padding`, take a random crop of the original size, flip half the images left-right.

    The standard CIFAR augmentation (He et al. 2016; Zagoruyko & Komodakis 2016; Madry et al.
    2018), done for the whole batch in one gather so it runs on x's device.

    Args:
        x: images (N, C, H, W) in [0, 1], on any device.
        generator: drives the crop offsets and flips (may live on another device than x).
        padding: pixels of zero padding on each side.

    Returns:
        Augmented images (N, C, H, W) on x's device; x itself is not modified.
    """
    n, _, height, width = x.shape
    offset_y = _draw(n, 2 * padding + 1, generator).to(x.device)
    offset_x = _draw(n, 2 * padding + 1, generator).to(x.device)
    flip = _draw(n, 2, generator).to(x.device).bool()
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offset_y[:, None] + torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device).expand(n, width)
    # A flipped crop reads its columns right to left: one index map does crop and flip together.
    cols = offset_x[:, None] + torch.where(flip[:, None], width - 1 - cols, cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def horizontal_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip a random half of the images (N, C, H, W) left-right (ImageNet training augmentation)."""
    flip = _draw(x.shape[0], 2, generator).to(x.device).bool()
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
