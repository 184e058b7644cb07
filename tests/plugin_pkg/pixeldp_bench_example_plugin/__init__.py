"""Example pixeldp-bench plugin: registers the `plugin_fgsm` attack and the certified `plugin_linear` defense."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks.template import register_attack
from bench.defense import Defense
from bench.registry import DEFENSES
from bench.types import ThreatModel

__all__ = ["CertifiedLinear", "fast_gradient_sign"]


@register_attack("plugin_fgsm", norm="linf")
def fast_gradient_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat: ThreatModel,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One signed-gradient step of size eps (FGSM, Goodfellow et al. 2015): x (N, C, H, W) -> x_adv, same shape.

    The template checks the norm, returns x at eps = 0 and projects the step into the ball and the box.
    `generator` is accepted because the runner passes one to every attack; FGSM draws nothing.
    """
    x_in = x.detach().clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x_in), y, reduction="sum"), x_in)
    return x.detach() + threat.eps * grad.sign()


@DEFENSES.register("plugin_linear", randomized=False, certified=True)
class CertifiedLinear(Defense):
    """A linear classifier on raw pixels with its exact L-inf certificate (margin over the dual L1 norm)."""

    @staticmethod
    def certified_norm(params: dict[str, Any]) -> str:
        """The radii of `certify` are L-inf distances."""
        return "linf"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """Cross-entropy of one clean batch x (N, C, H, W), y (N,): plain training, the certificate is exact."""
        return F.cross_entropy(model(x), y)

    def build_model(self) -> nn.Module:
        """(N, C, H, W) in [0, 1] -> logits (N, classes) = W x + b; ignores `arch` (the model must be linear)."""
        channels, height, width = self.spec.shape
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, self.spec.classes))

    @torch.no_grad()
    def certify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred (N,), radius (N,)) with radius = min_j (z_pred - z_j) / ||w_pred - w_j||_1.

        For logits z = W x + b the margin z_pred - z_j changes by at most ||w_pred - w_j||_1 * delta
        under an L-inf perturbation of size delta (Hoelder), so no point of that L-inf ball (with or
        without the [0, 1] box) changes the prediction: the radius is sound, and exact without the box.
        """
        if self.model is None:
            raise RuntimeError("attach a model before certifying")
        linear = next(m for m in self.model.modules() if isinstance(m, nn.Linear))
        logits = self.model(x)
        pred = logits.argmax(1)
        margins = logits.gather(1, pred[:, None]) - logits  # (N, K), >= 0
        dual = (linear.weight[pred][:, None, :] - linear.weight[None, :, :]).abs().sum(-1)  # (N, K) L1 norms
        ratio = margins / dual.clamp_min(1e-12)
        ratio[torch.arange(len(pred)), pred] = float("inf")  # the predicted class is no competitor
        return pred, ratio.min(1).values.clamp_min(0)

    def judge(self, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predictions on adversarial inputs with their certified radii (robust precision)."""
        return self.certify(x_adv)
