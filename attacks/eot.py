"""Expectation over Transformation (Athalye et al. 2018) as a model wrapper for randomized defenses."""
from __future__ import annotations

import math

import torch
from torch import nn

from bench.core.draws import noise_split, noisy_logits

__all__ = ["EOT", "AVERAGES", "set_progress", "judged_logits"]

AVERAGES = ("softmax", "logits")


class EOT(nn.Module):
    """Wraps a randomized model: x (N, C, H, W) -> an average over `draws` noise draws (N, K).

    With `average="softmax"` (default) the output is the log of the mean softmax, so that
    softmax(EOT(x)) is the expected class probability vector a noisy defense predicts with
    (PixelDP, Lecuyer et al. 2019, Sec. III-C) and any logit-based loss (CE, CW margin) attacks
    that expectation. With `average="logits"` the output is the mean of the logits, whose
    gradient is exactly the mean of the per-draw gradients.

    All draws run in ONE batched forward pass of N * draws rows (chunked by `chunk` rows to bound
    memory), so any attack, ours or a library's, receives gradients averaged over the draws.
    When the model exposes `pre_noise` / `noise` / `post_noise` (bench.core.models.ImageClassifier), the
    deterministic pre-noise part runs once per image and only the rest is replicated. The noise
    itself comes from the wrapped model (its noise layer and that layer's generator).

    Args:
        model: [0,1] images (N, C, H, W) -> logits (N, K), drawing fresh noise on every call.
        draws: noise draws per image (20 in the paper's attacks).
        chunk: at most this many replicated rows per forward call; None picks 8192 on CUDA and
            512 on CPU, where activations of a few hundred rows stay in cache (larger is slower).
        average: "softmax" (log of the mean probability) or "logits" (mean logit).
        draws_start: the draw schedule's first value: attacks that report their progress
            (`set_progress`) ramp linearly from `draws_start` to `draws` draws per step (cheap
            early steps, accurate late ones); None keeps `draws` throughout.
        judge_draws: fresh draws with which `fresh_logits` judges a candidate's success inside an
            attack (None: `draws`), so that a lucky few-draw success is not returned.
    """

    def __init__(self, model: nn.Module, draws: int = 20, chunk: int | None = None, average: str = "softmax",
                 draws_start: int | None = None, judge_draws: int | None = None):
        super().__init__()
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        if draws_start is not None and not 1 <= draws_start <= draws:
            raise ValueError(f"draws_start must be in [1, draws={draws}], got {draws_start}")
        if judge_draws is not None and judge_draws < 1:
            raise ValueError(f"judge_draws must be >= 1, got {judge_draws}")
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if average not in AVERAGES:
            raise ValueError(f"unknown average {average!r}; use one of {AVERAGES}")
        self.model = model
        self.final_draws = draws
        self.draws_start = draws if draws_start is None else draws_start
        self.draws = self.draws_start
        self.judge_draws = draws if judge_draws is None else judge_draws
        self.chunk = chunk
        self.average = average

    def set_progress(self, fraction: float) -> None:
        """Move along the draw schedule: `fraction` in [0, 1] of the attack's iterations are done."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.draws = max(1, round(self.draws_start + fraction * (self.final_draws - self.draws_start)))

    @torch.no_grad()
    def fresh_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The averaged output (N, K) over `judge_draws` fresh draws, without gradients (success judging)."""
        current = self.draws
        self.draws = self.judge_draws
        try:
            return self(x)
        finally:
            self.draws = current

    def draw_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every draw, (N, draws, K): bench.core.draws.noisy_logits over N * draws rows in all, chunked."""
        pre_noise, _, _ = noise_split(self.model)
        h = pre_noise(x)
        # Whole images per call; torch.split (unlike slicing) back-propagates without a full-size
        # zero gradient per chunk, and replicating per chunk bounds the peak memory.
        chunk = self.chunk or (8192 if x.is_cuda else 512)
        images = max(1, chunk // self.draws)
        return torch.cat([noisy_logits(self.model, piece, self.draws, image_major=True) for piece in h.split(images)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.draw_logits(x)
        if self.average == "logits":
            return logits.mean(dim=1)
        # log(mean softmax) via logsumexp: exact, and no clamp that would zero tiny probabilities' gradients.
        return torch.logsumexp(logits.log_softmax(dim=2), dim=1) - math.log(self.draws)


def set_progress(model: nn.Module, fraction: float) -> None:
    """Tell a model with a draw schedule (EOT) how far the attack is; a no-op for any other model."""
    hook = getattr(model, "set_progress", None)
    if callable(hook):
        hook(fraction)


def judged_logits(model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Logits (N, K) to judge success at x: fresh draws for an EOT model, else the `logits` already computed."""
    fresh = getattr(model, "fresh_logits", None)
    return fresh(x) if callable(fresh) else logits.detach()
