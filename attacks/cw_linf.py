"""Carlini-Wagner L-inf in its practical form: PGD on the CW margin loss at a fixed eps (Madry et al. 2018)."""
from __future__ import annotations

import torch
from torch import nn

from attacks.pgd import projected_gradient_descent
from attacks.template import register_attack
from bench.core.types import ThreatModel

__all__ = ["cw_linf"]


@register_attack("cw_linf", norm="linf", projected=True)
def cw_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat: ThreatModel, steps: int = 100,
            step_size: float | None = None, restarts: int = 1, random_start: bool = True,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD maximizing max_{i != y} Z_i - Z_y inside the L-inf ball (the CW f6 objective).

    The original CW L-inf attack shrinks a bound tau iteratively and is very slow; PGD on the
    same margin at a fixed eps is the strong practical variant (Madry et al. 2018, Sec. 5). For
    the original definition use `cw_linf@art` (ART's CarliniLInfMethod, minimum-norm).

    Args:
        model: [0,1] images (N, C, H, W) -> logits (N, K).
        x: clean images (N, C, H, W) in [0, 1]; never modified.
        y: true labels (N,).
        threat: an L-inf threat model (norm 'linf', eps).
        steps, step_size, restarts, random_start, generator: as in `projected_gradient_descent`.
    """
    return projected_gradient_descent(model, x, y, threat=threat, steps=steps, step_size=step_size,
                                      restarts=restarts, random_start=random_start, loss="cw", generator=generator)
