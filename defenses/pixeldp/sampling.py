"""Batched Monte Carlo over noise draws: pre-noise once per image, post-noise replicated, chunked."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bench.core.draws import noise_split, noisy_logits
from bench.core.subbatch import rows_within

__all__ = ["Samples", "sample", "block_rows", "CPU_BLOCK_BYTES"]

# CPU: the noised activations of one post-noise forward are kept to about this many bytes, so the
# noise, the ReLU after it and the next layer's inputs stay in the L2/L3 caches instead of
# streaming through memory. Measured on the paper's MNIST CNN (6,272 noised floats per row):
# blocks of 2048 rows ran 25% slower than blocks of 256-512 (~8 MB gives 334 rows).
CPU_BLOCK_BYTES = 8 << 20


@dataclass
class Samples:
    """Statistics of `draws` noisy forward passes per example (all (N, K), float64 numpy).

    mean / variance: Monte Carlo mean and unbiased sample variance of the softmax scores;
    counts: votes (how often each class was the argmax).
    """

    mean: np.ndarray
    variance: np.ndarray
    counts: np.ndarray
    draws: int


@torch.no_grad()
def sample(model: nn.Module, x: torch.Tensor, draws: int, *, chunk_rows: int = 2048,
           chunk_bytes: int | None = None) -> Samples:
    """Push `draws` independent noise draws of every image of x (N, C, H, W) through the noisy part.

    `model` is a bench.core.models.ImageClassifier whose `noise` is a NoiseLayer (any other model counts
    as all post-noise, see bench.core.draws.noise_split): the deterministic `pre_noise` runs ONCE per
    image, then blocks of noisy copies (at most `chunk_rows` rows and `chunk_bytes` bytes per
    forward: see `block_rows`) go through bench.core.draws.noisy_logits. Draws come from the noise
    layer's generator; the statistics do not depend on the blocking.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    pre_noise, _, post_noise = noise_split(model)
    per_chunk = max(1, chunk_rows)
    parts = []
    for i in range(0, x.shape[0], per_chunk):
        h = pre_noise(x[i:i + per_chunk])
        rows = block_rows(h, per_chunk, chunk_bytes, post_noise)
        parts += [_sample_images(model, h[j:j + rows], draws, rows) for j in range(0, h.shape[0], rows)]
    return Samples(mean=np.concatenate([p[0] for p in parts]), variance=np.concatenate([p[1] for p in parts]),
                   counts=np.concatenate([p[2] for p in parts]), draws=draws)


def block_rows(h: torch.Tensor, chunk_rows: int, chunk_bytes: int | None = None,
               post_noise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Rows per post-noise forward for pre-noise activations h (N, ...): at most `chunk_rows` and at most
    `chunk_bytes` (at least one row; bench.core.subbatch.rows_within).

    Without `chunk_bytes`: on CPU CPU_BLOCK_BYTES of noised activations, on CUDA half the free
    memory at the measured cost of a `post_noise` row (its peak activations, not just h's size).
    """
    return rows_within(post_noise or _identity, h, chunk_rows, chunk_bytes, cpu_bytes=CPU_BLOCK_BYTES)


def _identity(h: torch.Tensor) -> torch.Tensor:
    return h


def _sample_images(model: nn.Module, h: torch.Tensor, draws: int, rows: int):
    """Statistics of `draws` noisy copies of pre-noise activations h (n, ...), n <= rows, in blocks of <= rows rows."""
    n = h.shape[0]
    block = max(1, min(draws, rows // n))
    sums: list[torch.Tensor] = []  # softmax sum, sum of squares and votes (n, K), float64
    for done in range(0, draws, block):
        d = min(block, draws - done)
        probs = noisy_logits(model, h, d).float().softmax(dim=2)  # (d, n, K)
        votes = torch.zeros_like(probs[0]).scatter_add_(
            1, probs.argmax(dim=2).T, torch.ones(n, d, device=probs.device, dtype=probs.dtype))
        # Accumulate in float64: the variance is a difference of two large sums.
        probs64 = probs.double()
        block_sums = (probs64.sum(dim=0), probs64.square().sum(dim=0), votes.double())
        if not sums:
            sums = list(block_sums)
        else:
            for running, part in zip(sums, block_sums, strict=True):
                running += part  # in place: the tensors in `sums`
    total, sumsq, counts = sums  # draws >= 1 (checked by `sample`): the loop ran
    mean = total / draws
    variance = (sumsq - total * mean) / max(draws - 1, 1)
    return mean.cpu().numpy(), variance.clamp_min(0).cpu().numpy(), counts.cpu().numpy()
