"""EOT variants of the built-in attacks: the same attack run on EOT(model, draws) (Athalye et al. 2018)."""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

from attacks.apgd import apgd_l2, apgd_linf
from attacks.apgd_l1 import apgd_l1
from attacks.cw import cw_l2
from attacks.cw_linf import cw_linf
from attacks.eot import EOT
from attacks.pgd import projected_gradient_descent
from bench.registry import ATTACKS
from bench.types import ThreatModel


def with_eot(attack: Callable, name: str, draws: int = 20) -> Callable:
    """`attack` run against EOT(model, draws): gradients (and successes) use the mean over draws.

    The returned function has `attack`'s keyword-only hyperparameters plus `draws`, `chunk`,
    `average`, `draws_start` (a linear draw schedule from `draws_start` to `draws` over the attack's
    progress) and `judge_draws` (fresh draws that confirm a success inside the attack) in its
    signature, so profiles are validated and --max-steps / --max-draws cap them as usual.
    """

    @functools.wraps(attack)
    def eot_attack(model, x, y, *, threat: ThreatModel, draws: int = draws, chunk: int | None = None,
                   average: str = "softmax", draws_start: int | None = None, judge_draws: int | None = None,
                   **hparams):
        if draws_start is not None:
            draws_start = min(draws_start, draws)  # --max-draws may have capped `draws` below it
        wrapped = EOT(model, draws=draws, chunk=chunk, average=average, draws_start=draws_start,
                      judge_draws=judge_draws)
        return attack(wrapped, x, y, threat=threat, **hparams)

    base = inspect.signature(attack)
    extra = [inspect.Parameter("draws", inspect.Parameter.KEYWORD_ONLY, default=draws, annotation=int),
             inspect.Parameter("chunk", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"),
             inspect.Parameter("average", inspect.Parameter.KEYWORD_ONLY, default="softmax", annotation=str),
             inspect.Parameter("draws_start", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"),
             inspect.Parameter("judge_draws", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None")]
    eot_attack.__signature__ = base.replace(parameters=list(base.parameters.values()) + extra)
    eot_attack.__name__ = eot_attack.__qualname__ = name
    eot_attack.__doc__ = (f"{attack.__name__} against EOT(model, draws) (default {draws} draws, as in the paper); "
                          f"see attacks.eot.EOT.\n\n{attack.__doc__ or ''}")
    del eot_attack.__wrapped__  # the signature above is the truth; tools must not unwrap to `attack`
    return eot_attack


def _pgd_for(norm: str) -> Callable:
    def attack(model, x, y, *, threat: ThreatModel, steps: int = 40, step_size: float | None = None,
               restarts: int = 1, random_start: bool = True, loss: str = "ce",
               generator: torch.Generator | None = None):
        if threat.norm != norm:
            raise ValueError(f"this attack is {norm}; got a {threat.norm} threat model")
        return projected_gradient_descent(model, x, y, threat=threat, steps=steps, step_size=step_size,
                                          restarts=restarts, random_start=random_start, loss=loss, generator=generator)

    attack.__name__ = f"pgd_{norm}"
    attack.__doc__ = projected_gradient_descent.__doc__
    return attack


ATTACKS.register("cw_l2_eot", with_eot(cw_l2, "cw_l2_eot"), norm="l2", minimum_norm=True, eot=True)
ATTACKS.register("cw_linf_eot", with_eot(cw_linf, "cw_linf_eot"), norm="linf", minimum_norm=False, eot=True)
ATTACKS.register("pgd_linf_eot", with_eot(_pgd_for("linf"), "pgd_linf_eot"), norm="linf", minimum_norm=False,
                 eot=True)
ATTACKS.register("pgd_l2_eot", with_eot(_pgd_for("l2"), "pgd_l2_eot"), norm="l2", minimum_norm=False, eot=True)
ATTACKS.register("apgd_linf_eot", with_eot(apgd_linf, "apgd_linf_eot"), norm="linf", minimum_norm=False, eot=True)
ATTACKS.register("apgd_l2_eot", with_eot(apgd_l2, "apgd_l2_eot"), norm="l2", minimum_norm=False, eot=True)
ATTACKS.register("apgd_l1_eot", with_eot(apgd_l1, "apgd_l1_eot"), norm="l1", minimum_norm=False, eot=True)
