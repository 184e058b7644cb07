"""Auto-PGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum and checkpoints; CE and DLR losses."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attacks.eot import judged_logits, set_progress
from attacks.losses import logit_margin, other_classes
from attacks.template import register_attack, templated
from bench.core.types import ThreatModel

__all__ = ["auto_pgd", "apgd_linf", "apgd_l2", "checkpoints", "dlr_loss", "targeted_dlr_loss", "LOSSES"]

LOSSES = ("ce", "dlr", "dlr_targeted")
# Croce & Hein 2020, Sec. 3.2: momentum 0.75, step halved when fewer than rho of the steps since
# the last checkpoint raised the loss, first step 2 eps.
MOMENTUM = 0.75
RHO = 0.75


def checkpoints(steps: int) -> list[int]:
    """Iterations w_j = ceil(p_j * steps) at which the step size may halve (Croce & Hein 2020, Eq. 4).

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
    """
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = (math.ceil(round(q * steps, 9)) for q in p[1:])  # round: 0.22 + 0.19 + 0.16 must give 57, not 58
    return sorted({m for m in marks if m > 0})


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (N,): -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3) (Croce & Hein 2020, Eq. 6).

    Shift- and scale-invariant in the logits, so saturated softmaxes do not stall it. Needs K >= 3.
    """
    ordered, _ = logits.sort(dim=1, descending=True)
    return -logit_margin(logits, y) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (N,): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (Croce & Hein 2020, Eq. 7). Needs K >= 4."""
    ordered, _ = logits.sort(dim=1, descending=True)
    true = logits.gather(1, y[:, None]).squeeze(1)
    chosen = logits.gather(1, target[:, None]).squeeze(1)
    return -(true - chosen) / (ordered[:, 0] - (ordered[:, 2] + ordered[:, 3]) / 2 + 1e-12)


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent unit step: sign for L-inf, the normalized gradient for L2."""
    if norm == "linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))


def _view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def _apgd_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, threat: ThreatModel,
              steps: int, objective, progress: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run from `start` on a batch (n, ...); returns (x_adv (n, ...), adversarial flags (n,)).

    On a deterministic model an example stops being attacked once a point is misclassified. On a
    randomized one (an EOT wrapper, judged with fresh draws) a confirmed success near the decision
    boundary may still flip under the defense's own judge, so every example keeps climbing and the
    highest-loss confirmed adversarial point is returned. Otherwise the point of highest loss is.
    """
    randomized = callable(getattr(model, "fresh_logits", None))
    n = x.shape[0]
    marks = set(checkpoints(steps))
    step = torch.full((n,), 2.0 * threat.eps, device=x.device, dtype=x.dtype)

    def evaluate(points: torch.Tensor, rows: torch.Tensor):
        points = points.detach().requires_grad_(True)
        logits = model(points)
        loss = objective(logits, y[rows], rows)
        grad, = torch.autograd.grad(loss.sum(), points)
        return loss.detach(), grad.detach(), logits.detach()

    def newly_adversarial(points: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor,
                          loss: torch.Tensor) -> torch.Tensor:
        wrong = (logits.argmax(1) != y[rows]) & (loss > result_loss[rows])
        if bool(wrong.any()):
            # Confirm with fresh draws (EOT): a success of the attack's own draws may be luck.
            judged = judged_logits(model, points[wrong], logits[wrong]).argmax(1) != y[rows][wrong]
            wrong = wrong.clone()
            wrong[wrong.clone()] = judged
        return wrong

    rows = torch.arange(n, device=x.device)
    x_adv = start.clone()
    result = start.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    result_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)
    set_progress(model, progress[0])
    loss, grad, logits = evaluate(x_adv, rows)
    hit = newly_adversarial(x_adv, rows, logits, loss)
    found |= hit
    result[hit], result_loss[hit] = x_adv[hit], loss[hit]
    loss_best, x_best, grad_best = loss.clone(), x_adv.clone(), grad.clone()
    x_prev = x_adv.clone()
    raised = torch.zeros(n, device=x.device)
    last_step, last_best, last_mark = step.clone(), loss_best.clone(), 0
    for i in range(steps):
        active = rows if randomized else (~found).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        set_progress(model, progress[0] + (progress[1] - progress[0]) * (i + 1) / steps)
        xa, xo, xc = x_adv[active], x_prev[active], x[active]
        z = threat.project(xa + _view(step[active], xa) * _direction(grad[active], threat.norm), xc)
        moved = z if i == 0 else threat.project(xa + MOMENTUM * (z - xa) + (1 - MOMENTUM) * (xa - xo), xc)
        x_prev[active] = xa
        x_adv[active] = moved
        new_loss, new_grad, logits = evaluate(moved, active)
        hit = newly_adversarial(moved, active, logits, new_loss)
        found[active[hit]] = True
        result[active[hit]], result_loss[active[hit]] = moved[hit], new_loss[hit]
        raised[active] += (new_loss > loss[active]).float()
        loss[active], grad[active] = new_loss, new_grad
        better = new_loss > loss_best[active]
        improved = active[better]
        loss_best[improved], x_best[improved], grad_best[improved] = new_loss[better], moved[better], new_grad[better]
        if i + 1 in marks:
            # Halve the step where progress stalled, and restart those examples from their best point.
            interval = i + 1 - last_mark
            halve = (raised < RHO * interval) | ((last_step == step) & (last_best == loss_best))
            last_step, last_best, last_mark = step.clone(), loss_best.clone(), i + 1
            step = torch.where(halve, step / 2, step)
            x_adv[halve], grad[halve], loss[halve] = x_best[halve], grad_best[halve], loss_best[halve]
            x_prev[halve] = x_best[halve]  # no momentum across a restart
            raised.zero_()
    result[~found] = x_best[~found]
    return result.detach(), found


RunOne = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Callable, tuple[float, float]],
                  tuple[torch.Tensor, torch.Tensor]]


def restarted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat: ThreatModel, loss: str, restarts: int,
              target_classes: int, random_start: bool, generator: torch.Generator | None, run: RunOne,
              name: str) -> torch.Tensor:
    """The loss, target and restart loop every APGD variant shares; x_adv (N, C, H, W).

    `run(xs, ys, start, objective, progress)` is one APGD run of a norm on the examples still
    robust, returning (x_adv, found). Runs (restarts, and the targets of the targeted DLR loss, the
    clean point's most likely other classes in AutoAttack's order) continue only on examples no run
    has broken yet (Croce & Hein 2020).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown APGD loss {loss!r}; use one of {LOSSES}")
    x = x.detach()
    with torch.no_grad():
        clean_logits = model(x)
    classes = clean_logits.shape[1]
    if loss == "dlr_targeted":
        if classes < 4:
            raise ValueError(f"{name} (targeted DLR) needs at least 4 classes, the model has {classes}")
        ranked = other_classes(clean_logits, y).argsort(dim=1, descending=True)
        target_sets: list[torch.Tensor | None] = [ranked[:, k] for k in range(min(target_classes, classes - 1))]
    else:
        target_sets = [None]
    objectives = [_objective(loss, targets) for targets in target_sets]
    best = x.clone()
    robust = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    runs = [(objective, r) for objective in objectives for r in range(max(1, restarts))]
    for index, (objective, restart) in enumerate(runs):
        todo = robust.nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        xs, ys = x[todo], y[todo]
        start = threat.random_init(xs, generator) if (random_start or restart > 0) else xs.clone()

        def sub_objective(logits, labels, rows, objective=objective, todo=todo):
            return objective(logits, labels, todo[rows])

        x_adv, found = run(xs, ys, start, sub_objective, (index / len(runs), (index + 1) / len(runs)))
        # Keep the first run's highest-loss point for examples no run breaks; replace it on success.
        if index == 0:
            best[todo] = x_adv
        best[todo[found]] = x_adv[found]
        robust[todo[found]] = False
    return best


@templated(norms=("linf", "l2"))
def auto_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat: ThreatModel, steps: int = 100,
             loss: str = "ce", restarts: int = 1, target_classes: int = 9, random_start: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """APGD-CE / APGD-DLR / APGD-T (targeted DLR) in an L-inf or L2 ball; x_adv (N, C, H, W) in ball and box.

    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020, Algorithm 1: step 2 eps halved at checkpoints, momentum
    0.75. Runs (restarts, and targets for APGD-T) continue only on examples still robust, as in
    AutoAttack. Success is judged with fresh draws when the model is an EOT wrapper.

    Args:
        model: [0,1] images (N, C, H, W) -> logits (N, K); EOT(model) for randomized defenses.
        x: clean images (N, C, H, W) in [0, 1]; never modified.
        y: true labels (N,).
        threat: the ball (norm 'linf' or 'l2', eps); the template projects the output into it.
        steps: iterations per run (100 in AutoAttack).
        loss: 'ce', 'dlr' (untargeted) or 'dlr_targeted' (APGD-T over the top `target_classes`).
        restarts: random restarts per loss (and per target class).
        target_classes: for 'dlr_targeted', how many of the highest non-true classes to target (9).
        random_start: start uniformly in the ball (else at x for the first run).
        generator: drives the random starts.
    """
    def run(xs, ys, start, objective, progress):
        return _apgd_run(model, xs, ys, start, threat, steps, objective, progress)

    return restarted(model, x, y, threat=threat, loss=loss, restarts=restarts, target_classes=target_classes,
                     random_start=random_start, generator=generator, run=run, name="APGD-T")


def _objective(loss: str, targets: torch.Tensor | None):
    """loss(logits (n, K), labels (n,), rows (n,) indices into the batch) -> (n,), to maximize."""
    if targets is not None:
        return lambda logits, labels, rows: targeted_dlr_loss(logits, labels, targets[rows])
    if loss == "ce":
        return lambda logits, labels, rows: F.cross_entropy(logits, labels, reduction="none")
    return lambda logits, labels, rows: dlr_loss(logits, labels)


apgd_linf = register_attack("apgd_linf", auto_pgd, norm="linf", strong=True)
apgd_l2 = register_attack("apgd_l2", auto_pgd, norm="l2", strong=True)
