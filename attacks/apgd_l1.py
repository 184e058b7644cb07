"""L1-APGD (Croce & Hein, ICCV 2021, "Mind the box"): sparse steepest-ascent steps, adaptive sparsity, L1 ball."""
from __future__ import annotations

import math

import torch
from torch import nn

from attacks.apgd import restarted
from attacks.eot import judged_logits, set_progress
from attacks.template import register_attack
from bench.core.types import ThreatModel

__all__ = ["apgd_l1", "sparse_direction"]

# Croce & Hein 2021, Sec. 3.3 and their reference code: the sparsity k starts at 20% of the
# coordinates; every 4% of the iterations it is reset to ||x_best - x||_0 / 1.5, the step size (first
# value eps) is divided by 1.5 where the best point did not get sparser (down to eps / 10) and reset
# to eps, restarting from the best point, where it did.
FIRST_SPARSITY = 0.2
SPARSITY_SHRINK = 1.5
STEP_DECAY = 1.5
MIN_STEP_FRACTION = 0.1
CHECK_FRACTION = 0.04
SPARSER = 0.95
# The "large eps" schedule of AutoAttack's L1 version: 30% of the iterations at 3 eps, 30% at 2 eps,
# the rest at eps, each warm-started from the previous highest-loss point; only the last stage can
# return an adversarial example, since the others are outside the ball.
SCHEDULE = ((3.0, 0.3), (2.0, 0.3), (1.0, 0.4))


def _view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def sparse_direction(grad: torch.Tensor, x_adv: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """The box-aware L1 steepest-ascent direction over the top `fraction` of |grad| (N, ...), L1 norm 1 per row.

    Coordinates already at the box face towards which their gradient points cannot move, so they
    are dropped before ranking (otherwise the step's L1 budget is spent on pixels the projection
    clips back; Croce & Hein 2021, Sec. 3.2). Rows without a usable coordinate get a zero direction.

    Args:
        grad: input gradients (N, C, H, W); x_adv: the current points (N, C, H, W) in [0, 1];
        fraction: (N,) share of the coordinates to move (at least one).
    """
    flat_grad, flat_x = grad.flatten(1), x_adv.flatten(1)
    movable = ((flat_grad > 0) & (flat_x < 1)) | ((flat_grad < 0) & (flat_x > 0))
    size = flat_grad.abs() * movable
    dims = size.shape[1]
    k = (fraction * dims).ceil().long().clamp(1, dims)
    ranked, _ = size.sort(dim=1, descending=True)
    threshold = ranked.gather(1, (k - 1)[:, None])
    chosen = (size >= threshold) & (size > 0)
    count = chosen.sum(dim=1, keepdim=True).clamp_min(1)
    return (flat_grad.sign() * chosen / count).view_as(grad)


def _l1_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor, threat: ThreatModel,
            steps: int, objective, progress: tuple[float, float],
            schedule: tuple[tuple[float, float], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """One L1-APGD run from `start` on a batch (n, ...); returns (x_adv (n, ...), adversarial flags (n,)).

    As in attacks.apgd: on a deterministic model an example stops once it is misclassified; on an
    EOT wrapper every example keeps climbing and the highest-loss adversarial point confirmed with
    fresh draws is returned. Otherwise the point of highest loss in the final ball is.
    """
    randomized = callable(getattr(model, "fresh_logits", None))
    n, dims = x.shape[0], x[0].numel()
    rows = torch.arange(n, device=x.device)
    found = torch.zeros(n, dtype=torch.bool, device=x.device)
    result = start.clone()
    result_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)

    def evaluate(points: torch.Tensor, active: torch.Tensor):
        points = points.detach().requires_grad_(True)
        logits = model(points)
        loss = objective(logits, y[active], active)
        grad, = torch.autograd.grad(loss.sum(), points)
        return loss.detach(), grad.detach(), logits.detach()

    def record(points: torch.Tensor, active: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> None:
        wrong = (logits.argmax(1) != y[active]) & (loss > result_loss[active])
        if bool(wrong.any()):
            # Confirm with fresh draws (EOT): a success of the attack's own draws may be luck.
            judged = judged_logits(model, points[wrong], logits[wrong]).argmax(1) != y[active][wrong]
            wrong = wrong.clone()
            wrong[wrong.clone()] = judged
        hit = active[wrong]
        found[hit] = True
        result[hit], result_loss[hit] = points[wrong], loss[wrong]

    lengths = [math.ceil(share * steps) for _, share in schedule[:-1]]
    lengths.append(max(steps - sum(lengths), 0))
    done_steps, x_best = 0, start.clone()
    for stage, ((scale, _), length) in enumerate(zip(schedule, lengths, strict=True)):
        final = stage == len(schedule) - 1
        ball = ThreatModel("l1", threat.eps * scale)
        eps = ball.eps
        x_adv = ball.project(x_best, x)
        sparsity = (x_adv != x).flatten(1).sum(dim=1).to(x.dtype)
        fraction = torch.where(sparsity > 0, sparsity / dims / SPARSITY_SHRINK, torch.full_like(sparsity, 1.0))
        fraction = fraction.clamp(max=FIRST_SPARSITY)
        step = torch.full((n,), eps, device=x.device, dtype=x.dtype)
        check_every = max(int(CHECK_FRACTION * length), 1)
        set_progress(model, progress[0] + (progress[1] - progress[0]) * done_steps / max(steps, 1))
        loss, grad, logits = evaluate(x_adv, rows)
        if final:
            record(x_adv, rows, logits, loss)
        loss_best, x_best, grad_best = loss.clone(), x_adv.clone(), grad.clone()
        for i in range(length):
            active = rows if (randomized or not final) else (~found).nonzero().squeeze(1)
            if active.numel() == 0:
                break
            done_steps += 1
            set_progress(model, progress[0] + (progress[1] - progress[0]) * done_steps / max(steps, 1))
            xa, xc = x_adv[active], x[active]
            direction = sparse_direction(grad[active], xa, fraction[active])
            moved = ball.project(xa + _view(step[active], xa) * direction, xc)
            x_adv[active] = moved
            new_loss, new_grad, logits = evaluate(moved, active)
            if final:
                record(moved, active, logits, new_loss)
            grad[active] = new_grad
            better = new_loss > loss_best[active]
            improved = active[better]
            loss_best[improved], x_best[improved] = new_loss[better], moved[better]
            grad_best[improved] = new_grad[better]
            if (i + 1) % check_every == 0:
                # Adapt sparsity and step size to how sparse the best point has become.
                current = (x_best != x).flatten(1).sum(dim=1).to(x.dtype)
                sparser = current / sparsity.clamp_min(1) < SPARSER
                fraction = current / dims / SPARSITY_SHRINK
                step = torch.where(sparser, torch.full_like(step, eps), step / STEP_DECAY)
                step = step.clamp(MIN_STEP_FRACTION * eps, eps)
                sparsity = current
                x_adv[sparser], grad[sparser] = x_best[sparser], grad_best[sparser]
    result[~found] = x_best[~found]
    return result.detach(), found


@register_attack("apgd_l1", norm="l1", strong=True)
def apgd_l1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat: ThreatModel, steps: int = 100,
            loss: str = "ce", restarts: int = 1, target_classes: int = 9, random_start: bool = True,
            large_eps_schedule: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """L1-APGD-CE / -DLR / -T in the L1 ball intersected with the [0,1] box; x_adv (N, C, H, W) in both.

    Croce & Hein, "Mind the box: l1-APGD for sparse adversarial attacks on image classifiers",
    ICCV 2021: each step moves the top-k coordinates of |gradient| that the box lets move (equal
    shares of an L1 step), then projects exactly onto ball-and-box (bench.core.types.project_l1_box);
    k and the step size adapt to the sparsity of the best point found. Runs (restarts, and targets
    for the targeted DLR loss) continue only on examples still robust. Success is judged with fresh
    draws when the model is an EOT wrapper.

    Args:
        model: [0,1] images (N, C, H, W) -> logits (N, K); EOT(model) for randomized defenses.
        x: clean images (N, C, H, W) in [0, 1]; never modified.
        y: true labels (N,).
        threat: an L1 threat model (eps in [0,1]-pixel units); the template projects the output into it.
        steps: iterations per run (100, as in AutoAttack's L1 version).
        loss: 'ce', 'dlr' (untargeted) or 'dlr_targeted' (over the top `target_classes` classes).
        restarts: random restarts per loss (and per target class).
        target_classes: for 'dlr_targeted', how many of the highest non-true classes to target.
        random_start: start uniformly in the ball (else at x for the first run).
        large_eps_schedule: 30% of the steps at 3 eps and 30% at 2 eps before eps (AutoAttack's L1 setting).
        generator: drives the random starts.
    """
    schedule = SCHEDULE if large_eps_schedule and steps >= len(SCHEDULE) else ((1.0, 1.0),)

    def run(xs, ys, start, objective, progress):
        return _l1_run(model, xs, ys, start, threat, steps, objective, progress, schedule)

    return restarted(model, x, y, threat=threat, loss=loss, restarts=restarts, target_classes=target_classes,
                     random_start=random_start, generator=generator, run=run, name="L1-APGD-T")
