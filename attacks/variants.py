"""EOT variants of the built-in attacks: the same attack run on EOT(model, draws) (Athalye et al. 2018)."""
from __future__ import annotations

import inspect
from collections.abc import Callable

from attacks.apgd import apgd_l2, apgd_linf
from attacks.apgd_l1 import apgd_l1
from attacks.cw import cw_l2
from attacks.cw_linf import cw_linf
from attacks.eot import EOT
from attacks.pgd import pgd_l2, pgd_linf
from attacks.template import Contract, register_attack, templated
from bench.core.types import ThreatModel

__all__ = ["with_eot"]


def with_eot(attack: Callable, name: str, draws: int = 20) -> Callable:
    """`attack` (a templated attack) run against EOT(model, draws): gradients (and successes) use the mean over draws.

    The result is templated like `attack` (same norms, output contract and checks, which run once,
    outside the EOT wrapper) and has `attack`'s keyword-only hyperparameters plus `draws`, `chunk`,
    `average`, `draws_start` (a linear draw schedule from `draws_start` to `draws` over the attack's
    progress) and `judge_draws` (fresh draws that confirm a success inside the attack) in its
    signature, so profiles are validated and --max-steps / --max-draws cap them as usual.
    """
    contract: Contract | None = getattr(attack, "contract", None)
    if contract is None:
        raise TypeError(f"with_eot needs an attack made with attacks.template, got {attack!r}")
    algorithm = contract.algorithm

    def eot_algorithm(model, x, y, *, threat: ThreatModel, draws: int = draws, chunk: int | None = None,
                      average: str = "softmax", draws_start: int | None = None, judge_draws: int | None = None,
                      **hparams):
        if draws_start is not None:
            draws_start = min(draws_start, draws)  # --max-draws may have capped `draws` below it
        wrapped = EOT(model, draws=draws, chunk=chunk, average=average, draws_start=draws_start,
                      judge_draws=judge_draws)
        return algorithm(wrapped, x, y, threat=threat, **hparams)

    base = inspect.signature(algorithm)
    extra = [inspect.Parameter("draws", inspect.Parameter.KEYWORD_ONLY, default=draws, annotation=int),
             inspect.Parameter("chunk", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"),
             inspect.Parameter("average", inspect.Parameter.KEYWORD_ONLY, default="softmax", annotation=str),
             inspect.Parameter("draws_start", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"),
             inspect.Parameter("judge_draws", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None")]
    # The signature above is the truth: tools read it rather than unwrapping to `attack`.
    eot_algorithm.__signature__ = base.replace(parameters=list(base.parameters.values()) + extra)  # type: ignore[attr-defined]
    eot_algorithm.__name__ = eot_algorithm.__qualname__ = name
    eot_algorithm.__doc__ = (f"{attack.__name__} against EOT(model, draws) (default {draws} draws, as in the paper); "
                             f"see attacks.eot.EOT.\n\n{algorithm.__doc__ or ''}")
    return templated(eot_algorithm, norms=contract.norms, minimum_norm=contract.minimum_norm,
                     projected=contract.projected, idle=contract.idle, name=name)


register_attack("cw_l2_eot", with_eot(cw_l2, "cw_l2_eot"), norm="l2", eot=True)
register_attack("cw_linf_eot", with_eot(cw_linf, "cw_linf_eot"), norm="linf", eot=True)
register_attack("pgd_linf_eot", with_eot(pgd_linf, "pgd_linf_eot"), norm="linf", eot=True)
register_attack("pgd_l2_eot", with_eot(pgd_l2, "pgd_l2_eot"), norm="l2", eot=True)
register_attack("apgd_linf_eot", with_eot(apgd_linf, "apgd_linf_eot"), norm="linf", eot=True, strong=True)
register_attack("apgd_l2_eot", with_eot(apgd_l2, "apgd_l2_eot"), norm="l2", eot=True, strong=True)
register_attack("apgd_l1_eot", with_eot(apgd_l1, "apgd_l1_eot"), norm="l1", eot=True, strong=True)
