"""The undefended baseline: the architecture trained with plain cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.defense import Defense
from bench.core.registry import DEFENSES


@DEFENSES.register("undefended", family="undefended", randomized=False, certified=False)
class Undefended(Defense):
    """Standard training (cross-entropy, no noise, no adversarial examples)."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """Cross-entropy of one clean batch x (N, C, H, W), y (N,)."""
        return F.cross_entropy(model(x), y)
