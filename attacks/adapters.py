"""Adapters to torchattacks and ART attacks, registered as `<attack>@<library>` (libraries imported lazily).

Each adapter is only the library call: the attack template (attacks.template) checks the norm,
returns x at eps = 0 (or zero iterations), and re-projects the library's output into ball and box
(the libraries clip in their own float arithmetic) or, for minimum-norm attacks, keeps it only
within eps.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from attacks.template import register_attack
from bench.core.types import ThreatModel

__all__ = ["ART", "TORCHATTACKS", "KeepMode", "seeded"]

# The distributions each adapter runs (registration facts): their versions are part of the cells' keys.
TORCHATTACKS = ("torchattacks",)
ART = ("adversarial-robustness-toolbox",)


class KeepMode(nn.Module):
    """Forwards to `model` but ignores train()/eval(): both libraries force model.eval() inside
    their attacks, which must not switch off a randomized defense's noise layers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> KeepMode:
        # Deliberately not recursive: the wrapped model keeps whatever mode the defense set.
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@contextlib.contextmanager
def seeded(generator: torch.Generator | None, device: torch.device) -> Iterator[int]:
    """Run a library call with torch's and numpy's global RNGs seeded from `generator`, restored after.

    The libraries draw random starts from the global RNGs; seeding them from the cell's generator
    makes adapter runs reproducible without leaking state into the rest of the process.
    """
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu"))
    devices = [device] if device.type == "cuda" else []
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            np.random.seed(seed)
            yield seed
    finally:
        np.random.set_state(state)


def _classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def _step_size(threat: ThreatModel, steps: int, step_size: float | None) -> float:
    return 2.5 * threat.eps / max(steps, 1) if step_size is None else step_size


def _art_classifier(model: nn.Module, x: torch.Tensor):
    """An ART PyTorchClassifier on [0,1] inputs around a mode-locked model."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=KeepMode(model), loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                             nb_classes=_classes(model, x), clip_values=(0.0, 1.0),
                             device_type="gpu" if x.is_cuda else "cpu")


def _art_run(attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Run an ART attack on torch tensors with the true labels; back to a tensor on x's device."""
    x_adv = attack.generate(x=x.detach().cpu().numpy().astype(np.float32), y=y.detach().cpu().numpy())
    return torch.as_tensor(x_adv, dtype=x.dtype, device=x.device)


# --- torchattacks -------------------------------------------------------------------------------

@register_attack("pgd_linf@torchattacks", norm="linf", libraries=TORCHATTACKS)
def pgd_linf_torchattacks(model, x, y, *, threat: ThreatModel, steps: int = 40, step_size: float | None = None,
                          random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """torchattacks.PGD (L-inf, CE loss); step_size defaults to 2.5 eps / steps like ours."""
    import torchattacks

    runner = torchattacks.PGD(KeepMode(model), eps=threat.eps, alpha=_step_size(threat, steps, step_size),
                              steps=steps, random_start=random_start)
    with seeded(generator, x.device):
        return runner(x, y)


@register_attack("pgd_l2@torchattacks", norm="l2", libraries=TORCHATTACKS)
def pgd_l2_torchattacks(model, x, y, *, threat: ThreatModel, steps: int = 40, step_size: float | None = None,
                        random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """torchattacks.PGDL2 (CE loss)."""
    import torchattacks

    runner = torchattacks.PGDL2(KeepMode(model), eps=threat.eps, alpha=_step_size(threat, steps, step_size),
                                steps=steps, random_start=random_start)
    with seeded(generator, x.device):
        return runner(x, y)


@register_attack("pgd_linf_eot@torchattacks", norm="linf", libraries=TORCHATTACKS, eot=True)
def pgd_linf_eot_torchattacks(model, x, y, *, threat: ThreatModel, steps: int = 40, step_size: float | None = None,
                              draws: int = 20, random_start: bool = True,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """torchattacks.EOTPGD: L-inf PGD summing gradients over `draws` sequential forward passes."""
    import torchattacks

    runner = torchattacks.EOTPGD(KeepMode(model), eps=threat.eps, alpha=_step_size(threat, steps, step_size),
                                 steps=steps, eot_iter=draws, random_start=random_start)
    with seeded(generator, x.device):
        return runner(x, y)


@register_attack("cw_l2@torchattacks", norm="l2", libraries=TORCHATTACKS, minimum_norm=True)
def cw_l2_torchattacks(model, x, y, *, threat: ThreatModel, c: float = 1.0, kappa: float = 0.0, steps: int = 100,
                       lr: float = 1e-2, generator: torch.Generator | None = None) -> torch.Tensor:
    """torchattacks.CW: one fixed c, no binary search; its best adversarial found (else x)."""
    import torchattacks

    runner = torchattacks.CW(KeepMode(model), c=c, kappa=kappa, steps=steps, lr=lr)
    with seeded(generator, x.device):
        return runner(x, y)


_LIBRARY_NORMS = {"linf": "Linf", "l2": "L2"}


def _autoattack(norm: str):
    def autoattack(model, x, y, *, threat: ThreatModel, version: str = "standard",
                   generator: torch.Generator | None = None) -> torch.Tensor:
        import torchattacks

        with seeded(generator, x.device) as seed:
            runner = torchattacks.AutoAttack(KeepMode(model), norm=_LIBRARY_NORMS[norm], eps=threat.eps,
                                             version=version, n_classes=_classes(model, x), seed=seed)
            return runner(x, y)

    autoattack.__doc__ = (f"torchattacks.AutoAttack ({norm}); version 'standard' (APGD-CE, APGD-T, FAB-T, Square), "
                          "'plus', or 'rand' (APGD-CE/DLR with 20 EOT iterations, for randomized defenses).")
    return autoattack


def _square(norm: str):
    def square(model, x, y, *, threat: ThreatModel, queries: int = 5000, restarts: int = 1, p_init: float = 0.8,
               generator: torch.Generator | None = None) -> torch.Tensor:
        import torchattacks

        with seeded(generator, x.device) as seed:
            runner = torchattacks.Square(KeepMode(model), norm=_LIBRARY_NORMS[norm], eps=threat.eps,
                                         n_queries=queries, n_restarts=restarts, p_init=p_init, loss="margin",
                                         seed=seed)
            return runner(x, y)

    square.__doc__ = (f"torchattacks.Square ({norm}, margin loss): the gradient-free score-based attack of "
                      "Andriushchenko et al. 2020, used by bench.reporting.checks to detect gradient masking (it "
                      "needs no gradients).")
    return square


register_attack("autoattack@torchattacks", _autoattack("linf"), norm="linf", strong=True, ensemble=True,
                libraries=TORCHATTACKS)
register_attack("autoattack_l2@torchattacks", _autoattack("l2"), norm="l2", strong=True, ensemble=True,
                libraries=TORCHATTACKS)
register_attack("square_linf@torchattacks", _square("linf"), norm="linf", idle=("queries",), gradient_free=True,
                libraries=TORCHATTACKS)
register_attack("square_l2@torchattacks", _square("l2"), norm="l2", idle=("queries",), gradient_free=True,
                libraries=TORCHATTACKS)


# --- ART ----------------------------------------------------------------------------------------

def _pgd_art(norm: str):
    def pgd_art(model, x, y, *, threat: ThreatModel, steps: int = 40, step_size: float | None = None,
                restarts: int = 1, random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        from art.attacks.evasion import ProjectedGradientDescent

        runner = ProjectedGradientDescent(_art_classifier(model, x), norm=np.inf if norm == "linf" else 2,
                                          eps=threat.eps, eps_step=_step_size(threat, steps, step_size),
                                          max_iter=steps, num_random_init=restarts if random_start else 0,
                                          batch_size=x.shape[0], verbose=False)
        with seeded(generator, x.device):
            return _art_run(runner, x, y)

    pgd_art.__doc__ = f"ART ProjectedGradientDescent ({norm}, CE loss); `restarts` random starts when random_start."
    return pgd_art


register_attack("pgd_linf@art", _pgd_art("linf"), norm="linf", libraries=ART)
register_attack("pgd_l2@art", _pgd_art("l2"), norm="l2", libraries=ART)


@register_attack("cw_l2@art", norm="l2", libraries=ART, minimum_norm=True)
def cw_l2_art(model, x, y, *, threat: ThreatModel, steps: int = 100, binary_steps: int = 9, c: float = 1e-3,
              lr: float = 1e-2, kappa: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """ART CarliniL2Method (binary search over c, line search on the step); minimum-norm, else x."""
    from art.attacks.evasion import CarliniL2Method

    runner = CarliniL2Method(_art_classifier(model, x), confidence=kappa, learning_rate=lr,
                             binary_search_steps=binary_steps, max_iter=steps, initial_const=c,
                             batch_size=x.shape[0], verbose=False)
    with seeded(generator, x.device):
        return _art_run(runner, x, y)


@register_attack("cw_linf@art", norm="linf", libraries=ART, minimum_norm=True)
def cw_linf_art(model, x, y, *, threat: ThreatModel, steps: int = 10, lr: float = 1e-2, kappa: float = 0.0,
                decrease_factor: float = 0.9, c: float = 1e-5, largest_c: float = 20.0, c_factor: float = 2.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """ART CarliniLInfMethod: the original tau-shrinking CW L-inf (slow: one example at a time).

    Minimum-norm: the smallest L-inf adversarial found per example, else x. `c`, `largest_c` and
    `c_factor` are ART's initial_const, largest_const and const_factor.
    """
    from art.attacks.evasion import CarliniLInfMethod

    runner = CarliniLInfMethod(_art_classifier(model, x), confidence=kappa, learning_rate=lr, max_iter=steps,
                               decrease_factor=decrease_factor, initial_const=c, largest_const=largest_c,
                               const_factor=c_factor, batch_size=1, verbose=False)
    with seeded(generator, x.device):
        return _art_run(runner, x, y)
