"""Attack objectives on logits (N, K) with true labels y (N,); larger means more adversarial."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (N,)."""
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float = float("inf")) -> torch.Tensor:
    """Per-example max_{i != y} Z_i - Z_y (N,), capped at kappa (Carlini & Wagner 2017, f6).

    The true logit is masked with -inf rather than 0, which is wrong when all logits are negative.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return (others - true).clamp(max=kappa)


LOSSES = {"ce": cross_entropy, "cw": cw_margin}


def get_loss(name: str):
    """The loss called `name` ('ce' or 'cw')."""
    if name not in LOSSES:
        raise ValueError(f"unknown attack loss {name!r}; use one of {sorted(LOSSES)}")
    return LOSSES[name]
