"""The input-gradient health of a model, measured by the runner for bench.reporting.checks' gradient-masking warning."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks.losses import logit_margin

__all__ = ["ZERO_GRADIENT", "zero_gradient_fraction", "probe_gradients"]

# Input gradients this small (L2 norm per example) carry no usable direction in float32.
ZERO_GRADIENT = 1e-10


def zero_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Fractions of examples whose input gradient is ~0, for the CE loss and for the logit margin.

    A zero margin gradient means the model itself hides gradients (masking, e.g. quantization); a
    zero CE gradient alone means a saturated softmax that stalls CE-based attacks (use the CW loss).

    Args:
        model: [0,1] images (N, C, H, W) -> logits (N, K).
        x: images (N, C, H, W); y: true labels (N,).
    """
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    ce_grad, = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x, retain_graph=True)
    margin_grad, = torch.autograd.grad(logit_margin(logits, y).sum(), x)
    return {name: float((grad.flatten(1).norm(dim=1) < ZERO_GRADIENT).float().mean())
            for name, grad in (("ce", ce_grad), ("margin", margin_grad))}


def probe_gradients(defense: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """`zero_gradient_fraction` on a defense's model, leaving its noise generator and torch's RNG untouched."""
    generator = getattr(defense, "generator", None)
    state = generator.get_state() if generator is not None else None
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            return zero_gradient_fraction(defense.model, x, y)
    finally:
        if generator is not None:
            generator.set_state(state)
