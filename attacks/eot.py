"""Expectation over Transformation (Athalye et al. 2018) as a model wrapper for randomized defenses."""
from __future__ import annotations

import torch
from torch import nn


class EOT(nn.Module):
    """Wraps a randomized model: x (N, C, H, W) -> log of the mean softmax over `draws` noise draws (N, K).

    All draws run in ONE batched forward pass of N * draws rows (chunked by `chunk` rows to bound
    memory), so any attack, ours or a library's, receives gradients averaged over the draws.
    When the model exposes `pre_noise` / `noise` / `post_noise` (bench.models.ImageClassifier), the
    deterministic pre-noise part runs once per image and only the rest is replicated.
    """

    def __init__(self, model: nn.Module, draws: int = 20, chunk: int = 8192):
        super().__init__()
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.model = model
        self.draws = draws
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = all(hasattr(self.model, name) for name in ("pre_noise", "noise", "post_noise"))
        h = self.model.pre_noise(x) if split else x
        replicated = h.repeat_interleave(self.draws, dim=0)
        parts = []
        for start in range(0, replicated.shape[0], self.chunk):
            piece = replicated[start:start + self.chunk]
            logits = self.model.post_noise(self.model.noise(piece)) if split else self.model(piece)
            parts.append(logits.softmax(dim=1))
        probs = torch.cat(parts).view(x.shape[0], self.draws, -1).mean(dim=1)
        return probs.clamp_min(1e-12).log()
