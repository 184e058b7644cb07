"""Attack objectives on logits (N, K) with true labels y (N,); the one logit margin every attack and check uses."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["other_classes", "logit_margin", "cross_entropy", "cw_margin", "LOSSES", "get_loss"]


def other_classes(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits (N, K) with each row's `labels` entry set to -inf, so max/argsort see only the other classes.

    Masking with -inf rather than 0 matters: with 0, an all-negative row would report 0 as its
    largest other logit (torchattacks' CW masking has this bug).
    """
    return logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Z_label - max_{i != label} Z_i (N,): positive exactly when `labels` is the strict argmax.

    The margin of Carlini & Wagner 2017's objective f6 and of Croce & Hein 2020's DLR loss.
    """
    chosen = logits.gather(1, labels[:, None]).squeeze(1)
    return chosen - other_classes(logits, labels).amax(dim=1)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (N,)."""
    return F.cross_entropy(logits, y, reduction="none")


def cw_margin(logits: torch.Tensor, y: torch.Tensor, kappa: float = float("inf")) -> torch.Tensor:
    """Per-example max_{i != y} Z_i - Z_y (N,), capped at kappa (Carlini & Wagner 2017, f6): the loss to maximize."""
    return (-logit_margin(logits, y)).clamp(max=kappa)


LOSSES = {"ce": cross_entropy, "cw": cw_margin}


def get_loss(name: str):
    """The loss called `name` ('ce' or 'cw')."""
    if name not in LOSSES:
        raise ValueError(f"unknown attack loss {name!r}; use one of {sorted(LOSSES)}")
    return LOSSES[name]
