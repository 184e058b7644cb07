"""The one noise-replicating forward pass: many noise draws of a batch through a randomized model.

EOT (attacks.eot), PixelDP's Monte Carlo sampling (defenses.pixeldp.sampling) and the overhead
timing (bench.execution.overhead, through that sampling) all run their draws through `noisy_logits`, so the
overhead table times the code that certifies and the attacks differentiate through the same pass.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

__all__ = ["noise_split", "noisy_logits"]

Stage = Callable[[torch.Tensor], torch.Tensor]


def _identity(h: torch.Tensor) -> torch.Tensor:
    return h


def noise_split(model: nn.Module) -> tuple[Stage, Stage, Stage]:
    """(pre_noise, noise, post_noise) of a model that exposes them (bench.core.models.ImageClassifier).

    Any other model counts as all post-noise: (identity, identity, model), so replicating its
    input and calling it draws its own randomness once per row.
    """
    if all(hasattr(model, name) for name in ("pre_noise", "noise", "post_noise")):
        return cast("tuple[Stage, Stage, Stage]", (model.pre_noise, model.noise, model.post_noise))
    return _identity, _identity, model


def noisy_logits(model: nn.Module, h: torch.Tensor, draws: int, *, image_major: bool = False) -> torch.Tensor:
    """Logits of `draws` noise draws of pre-noise activations h (n, ...): (draws, n, K); (n, draws, K) if image_major.

    One batched post-noise forward of draws * n rows (differentiable in h). Draw-major rows (draw
    j of image i is row j*n + i) let a noise layer with `replicate` (PixelDP's NoiseLayer) write
    the noisy copies without a copy of h; image-major rows (row i*draws + j) keep an image's draws
    adjacent. Both draw i.i.d. noise; each caller keeps the layout its seeded results were made
    with (PixelDP's certificates draw-major, EOT's attacks image-major), so they stay reproducible.
    """
    _, noise, post_noise = noise_split(model)
    n = h.shape[0]
    if image_major:
        return post_noise(noise(h.repeat_interleave(draws, dim=0))).view(n, draws, -1)
    replicate = getattr(noise, "replicate", None)
    noisy = replicate(h, draws) if callable(replicate) else noise(h.repeat(draws, *([1] * (h.dim() - 1))))
    return post_noise(noisy).view(draws, n, -1)
