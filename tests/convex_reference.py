"""The original Wong-Kolter code (convex_adversarial, optional) on a project network, for tests and benchmarks."""
from __future__ import annotations

import warnings

import torch
from torch import nn

try:
    import convex_adversarial
except ImportError:  # optional: callers skip, or drop the comparison
    convex_adversarial = None


def plain_sequential(model: nn.Module) -> nn.Sequential:
    """The classifier's layers as the flat Sequential convex_adversarial reads (single-channel Normalize is 1)."""
    return nn.Sequential(*[m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear | nn.ReLU | nn.Flatten)])


def original_margins(sequential: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float,
                     bounded_input: bool = True) -> torch.Tensor:
    """(N, K) convex_adversarial's lower bounds of z_y - z_j over the L-inf ball and [0, 1] box (RobustBounds
    returns their negatives); `bounded_input=False`: over the plain ball, as their paper reports."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its torch 0.4-era code warns about Variable and reductions
        with torch.no_grad():
            return -convex_adversarial.RobustBounds(sequential, eps, bounded_input=bounded_input)(x, y)


def original_training_step(sequential: nn.Sequential, x: torch.Tensor, y: torch.Tensor, eps: float) -> None:
    """One backward pass of convex_adversarial's robust cross-entropy (Wong & Kolter 2018's training loss)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sequential.zero_grad()
        convex_adversarial.robust_loss(sequential, eps, x, y, bounded_input=True)[0].backward()
