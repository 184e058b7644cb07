"""Projected gradient descent (Madry et al. 2018) in L-inf, L2 and L1 balls, with restarts; registered for L-inf, L2."""
from __future__ import annotations

import torch
from torch import nn

from attacks.losses import get_loss
from attacks.template import register_attack, templated
from bench.core.types import NORMS, ThreatModel

__all__ = ["projected_gradient_descent", "pgd_linf", "pgd_l2"]


def _ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent unit step for the norm: sign for L-inf, normalized gradient for L2."""
    if norm == "linf":
        return grad.sign()
    flat = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return grad / flat.view(-1, *([1] * (grad.dim() - 1)))


@templated(norms=NORMS, projected=True)
def projected_gradient_descent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat: ThreatModel,
                               steps: int = 40, step_size: float | None = None, restarts: int = 1,
                               random_start: bool = True, loss: str = "ce",
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted PGD in an L-inf, L2 or L1 ball; returns x_adv (N, C, H, W) inside the ball and [0,1].

    Every iterate is projected (ThreatModel.project); for L1 the step is the normalized gradient,
    which attacks.apgd_l1's sparse steps beat.

    Args:
        model: [0,1] images (N, C, H, W) -> logits (N, K).
        x: clean images (N, C, H, W) in [0, 1]; never modified.
        y: true labels (N,).
        threat: the ball (norm, eps).
        steps: gradient steps per restart.
        step_size: per-step size; default 2.5 * eps / steps (Madry et al. 2018).
        restarts: independent random starts; per example the most adversarial one is kept.
        random_start: start uniformly in the ball (otherwise at x; only the first restart).
        loss: 'ce' (cross-entropy) or 'cw' (Carlini-Wagner margin).
        generator: drives the random starts, for seeded determinism.
    """
    objective = get_loss(loss)
    step_size = 2.5 * threat.eps / steps if step_size is None else step_size
    best = x.clone()
    best_score = torch.full((x.shape[0],), -float("inf"), device=x.device)
    was_training = model.training
    for restart in range(max(1, restarts)):
        x_adv = threat.random_init(x, generator) if (random_start or restart > 0) else x.clone()
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            score = objective(model(x_adv), y)
            grad, = torch.autograd.grad(score.sum(), x_adv)
            x_adv = threat.project(x_adv.detach() + step_size * _ascent_direction(grad, threat.norm), x)
        with torch.no_grad():
            logits = model(x_adv)
            # Rank restarts by misclassification first, then by the loss value.
            score = objective(logits, y) + 1e6 * (logits.argmax(1) != y).float()
            better = score > best_score
            # torch.where, not a boolean-mask assignment: no device sync per restart.
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
            best_score = torch.where(better, score, best_score)
    model.train(was_training)
    return best.detach()


pgd_linf = register_attack("pgd_linf", projected_gradient_descent, norm="linf")
pgd_l2 = register_attack("pgd_l2", projected_gradient_descent, norm="l2")
