"""Madry et al. (2018) PGD adversarial training, L-inf or L2, with the fast FGSM variant (Wong et al. 2020)."""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attacks.pgd import projected_gradient_descent
from bench.core.data import DatasetSpec
from bench.core.defense import Defense
from bench.core.registry import DEFENSES
from bench.core.types import ThreatModel


class CatastrophicOverfittingWarning(UserWarning):
    """PGD accuracy on the monitor batch collapsed during fast adversarial training."""


@DEFENSES.register("madry", family="Madry", randomized=False, certified=False)
class Madry(Defense):
    """Train on PGD adversarial examples from a uniform random start (Madry et al., ICLR 2018).

    The training attack (`attack_steps`, `step_size`) and the evaluation attack of the training-time
    robustness check (`eval_steps`, `eval_step_size`, `eval_restarts`) are configured separately.
    With `fast=True` the training attack is one FGSM step of `fast_step * eps` from a uniform
    random start ("Fast is better than free", Wong, Rice & Kolter, ICLR 2020); every
    `check_every` steps (about an epoch) PGD accuracy is measured on a fixed monitor batch, and a
    drop of more than `overfit_drop` below the best seen so far is recorded in `overfit_steps` and
    warned about (catastrophic overfitting).

    Args:
        spec: the dataset.
        norm: 'linf' or 'l2'.
        eps: training radius (MNIST L-inf 0.3, CIFAR-10 L-inf 8/255 in the paper).
        attack_steps: PGD steps per training example (MNIST 40, CIFAR-10 7); named apart from
            `steps`, which is the number of optimizer steps as for every defense.
        step_size: PGD step (MNIST 0.01, CIFAR-10 2/255); default 2.5 * eps / attack_steps.
        fast: use FGSM from a random start instead of PGD.
        fast_step: FGSM step as a multiple of eps (1.25 in Wong et al. 2020).
        eval_steps, eval_step_size, eval_restarts: the monitoring PGD attack.
        check_every: optimizer steps between robustness checks (0 disables them).
        check_examples: size of the monitor batch (the first training examples seen).
        overfit_drop: PGD-accuracy drop (absolute) that flags catastrophic overfitting.
        attack_seed: seeds the robustness checks (training draws come from the loop's per-step generator).
        eps_ramp_steps: steps over which the training eps ramps linearly up to `eps` (0: full eps at once).
        **train: TrainConfig fields and arch / arch_params.
    """

    def __init__(self, spec: DatasetSpec, *, norm: str = "linf", eps: float = 0.3, attack_steps: int = 40,
                 step_size: float | None = None, fast: bool = False, fast_step: float = 1.25,
                 eval_steps: int = 20, eval_step_size: float | None = None, eval_restarts: int = 1,
                 check_every: int = 100, check_examples: int = 100, overfit_drop: float = 0.2,
                 attack_seed: int = 0, eps_ramp_steps: int = 0, **train: Any):
        super().__init__(spec, **train)
        self.threat = ThreatModel(norm, float(eps))
        if attack_steps < 1 or eval_steps < 1 or check_every < 0 or check_examples < 1 or not fast_step > 0:
            raise ValueError("need attack_steps >= 1, eval_steps >= 1, check_every >= 0, check_examples >= 1 "
                             "and fast_step > 0")
        self.attack_steps, self.step_size = int(attack_steps), step_size
        self.fast, self.fast_step = bool(fast), float(fast_step)
        self.eval_steps, self.eval_step_size, self.eval_restarts = int(eval_steps), eval_step_size, int(eval_restarts)
        self.check_every, self.check_examples, self.overfit_drop = int(check_every), int(check_examples), overfit_drop
        self.attack_seed = int(attack_seed)
        if eps_ramp_steps < 0:
            raise ValueError("eps_ramp_steps must be >= 0")
        self.eps_ramp_steps = int(eps_ramp_steps)
        self.history: list[tuple[int, float]] = []  # (step, PGD accuracy on the monitor batch)
        self.overfit_steps: list[int] = []
        self._monitor: tuple[torch.Tensor, torch.Tensor] | None = None
        self._train_generator: torch.Generator | None = None
        self._step = 0

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.step_generator is not None and self.step_generator.device == device:
            return self.step_generator  # the training loop's per-step generator (reproducible, resumable)
        if self._train_generator is None or self._train_generator.device != device:
            self._train_generator = torch.Generator(device=device).manual_seed(self.attack_seed)
        return self._train_generator

    def eps_fraction(self, step: int) -> float:
        """Training eps as a fraction of the target: linear from 1/ramp to 1 over `eps_ramp_steps` steps.

        Large L-inf budgets from step 0 can leave a fresh network at chance (loss ln 10); ramping the
        budget, as convex training does, avoids it.
        """
        return 1.0 if self.eps_ramp_steps == 0 else min(1.0, (step + 1) / self.eps_ramp_steps)

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The training attack's x_adv (N, C, H, W): PGD, or FGSM from a random start when fast."""
        generator = self._generator(x.device)
        fraction = 1.0 if step is None else self.eps_fraction(step)
        threat = self.threat if fraction == 1.0 else ThreatModel(self.threat.norm, self.threat.eps * fraction)
        if self.fast:
            return projected_gradient_descent(model, x, y, threat=threat, steps=1,
                                              step_size=self.fast_step * threat.eps, generator=generator)
        step_size = None if self.step_size is None else self.step_size * fraction
        return projected_gradient_descent(model, x, y, threat=threat, steps=self.attack_steps,
                                          step_size=step_size, generator=generator)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """Cross-entropy on the training attack's adversarial examples (the inner max of the saddle point)."""
        self._step = step
        if self._monitor is None and self.check_every:
            self._monitor = (x[:self.check_examples].detach().clone(), y[:self.check_examples].clone())
        x_adv = self.adversarial(model, x, y, step)
        return F.cross_entropy(model(x_adv), y)

    def robust_accuracy(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """Accuracy under the evaluation PGD attack (fixed seed) on x (N, C, H, W)."""
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=x.device).manual_seed(self.attack_seed + 1)
        x_adv = projected_gradient_descent(model, x, y, threat=self.threat, steps=self.eval_steps,
                                           step_size=self.eval_step_size, restarts=self.eval_restarts,
                                           generator=generator)
        with torch.no_grad():
            accuracy = (model(x_adv).argmax(1) == y).float().mean().item()
        model.train(was_training)
        return accuracy

    def train_state(self) -> dict:
        """The robustness-check history and monitor batch, so a resumed training checks the same batch."""
        state: dict = {"history": [list(h) for h in self.history], "overfit_steps": list(self.overfit_steps)}
        if self._monitor is not None:
            state["monitor_x"], state["monitor_y"] = self._monitor
        return state

    def load_train_state(self, state: dict) -> None:
        self.history = [(int(s), float(a)) for s, a in state.get("history", [])]
        self.overfit_steps = [int(s) for s in state.get("overfit_steps", [])]
        if "monitor_x" in state:
            self._monitor = (state["monitor_x"], state["monitor_y"])

    def after_step(self, model: nn.Module) -> None:
        """Every `check_every` steps, measure PGD accuracy on the monitor batch; flag collapses."""
        if not self.check_every or self._monitor is None or (self._step + 1) % self.check_every:
            return
        accuracy = self.robust_accuracy(model, *self._monitor)
        best = max((a for _, a in self.history), default=accuracy)
        self.history.append((self._step + 1, accuracy))
        if accuracy < best - self.overfit_drop:
            self.overfit_steps.append(self._step + 1)
            warnings.warn(f"catastrophic overfitting at step {self._step + 1}: PGD accuracy on the monitor "
                          f"batch fell from {best:.2f} to {accuracy:.2f}; lower fast_step or use PGD training",
                          CatastrophicOverfittingWarning, stacklevel=2)
