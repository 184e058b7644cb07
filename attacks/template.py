"""The attack template: the checks and output contract every attack shares, and its registration.

An attack is written as its algorithm only, `algorithm(model, x, y, *, threat, **hparams) -> x_adv`
(x (N, C, H, W) in [0, 1], true labels y (N,)), and registered with one decorator:

    @register_attack("my_pgd", norm="linf")
    def my_pgd(model, x, y, *, threat, steps=10, generator=None):
        ...
        return x_adv

The template then owns what every attack would otherwise repeat (in the spirit of foolbox 3's
attack base): the threat model's norm must be the attack's (else one ValueError naming both);
eps = 0, or a zero iteration count, returns a copy of x without running the algorithm; the output
is detached and made to honour the contract (a fixed-budget attack's output is projected into the
eps-ball and the [0, 1] box; a minimum-norm attack's output is x wherever it is larger than eps)
and checked (shape, finite, ball and box: `bench.types.checked_attack_output`, which the runner runs too).
"""
from __future__ import annotations

import functools
import inspect
import math
import weakref
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import torch
from torch import nn

from bench.core.registry import ATTACKS, AttackInfo, Registry, RegistrationError
from bench.core.types import NORMS, AttackOutputError, ThreatModel, checked_attack_output

__all__ = ["AttackOutputError", "Contract", "templated", "register_attack", "within_budget", "check_attack"]

Algorithm = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Contract:
    """What the template guarantees around `algorithm`.

    Attributes:
        algorithm: the attack's own code, (model, x, y, *, threat, **hparams) -> x_adv (N, C, H, W).
        norms: threat-model norms the algorithm supports.
        minimum_norm: the algorithm looks for the smallest adversarial example (run at eps = inf);
            its output is x wherever that example is larger than a finite eps.
        projected: the algorithm already projects every iterate into ball and box (PGD), so the
            output is only checked; otherwise a fixed-budget output is projected once at the end.
        idle: hyperparameters whose value 0 means "no attack" (e.g. steps): x is returned.
    """

    algorithm: Algorithm
    norms: tuple[str, ...]
    minimum_norm: bool = False
    projected: bool = False
    idle: tuple[str, ...] = ()


def within_budget(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Minimum-norm output under a finite budget: x itself where x_adv is outside the box or the eps-ball."""
    x_adv = x_adv.clamp(0.0, 1.0)
    if math.isinf(threat.eps):
        return x_adv
    # Allow float32 round-off of the norm; anything clearly larger counts as a failure at this eps.
    outside = threat.norm_of(x_adv - x) > threat.eps * (1 + 1e-6)
    return torch.where(outside.view(-1, *([1] * (x.dim() - 1))), x, x_adv)


def templated(algorithm: Algorithm | None = None, *, norms: tuple[str, ...] | str, minimum_norm: bool = False,
              projected: bool = False, idle: tuple[str, ...] | None = None, name: str | None = None):
    """`algorithm` wrapped in the template (see the module docstring); a decorator when `algorithm` is omitted.

    The result has the algorithm's signature (so profiles are validated against its hyperparameters)
    and a `contract` attribute. `idle` defaults to ("steps",) when the algorithm has `steps`.
    """
    if algorithm is None:
        return functools.partial(templated, norms=norms, minimum_norm=minimum_norm, projected=projected, idle=idle,
                                 name=name)
    norms = (norms,) if isinstance(norms, str) else tuple(norms)
    unknown = [n for n in norms if n not in NORMS]
    if not norms or unknown:
        raise ValueError(f"an attack's norms must be among {NORMS}, got {norms}")
    parameters = inspect.signature(algorithm).parameters
    if "threat" not in parameters or parameters["threat"].kind is not inspect.Parameter.KEYWORD_ONLY:
        raise TypeError(f"{algorithm.__name__} must take the threat model as a keyword-only argument `threat`")
    if idle is None:
        idle = ("steps",) if "steps" in parameters else ()
    missing = [k for k in idle if k not in parameters]
    if missing:
        raise TypeError(f"{algorithm.__name__} has no hyperparameter {missing[0]!r} (named in idle)")
    contract = Contract(algorithm, norms, bool(minimum_norm), bool(projected), tuple(idle))
    defaults = {k: p.default for k, p in parameters.items() if p.default is not p.empty}
    label = name or algorithm.__name__

    @functools.wraps(algorithm)
    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, threat: ThreatModel,
               **hparams: Any) -> torch.Tensor:
        _check_arguments(label, contract, x, y, threat)
        if threat.eps == 0 or any(hparams.get(k, defaults.get(k)) == 0 for k in contract.idle):
            return x.clone()
        x_adv = contract.algorithm(model, x, y, threat=threat, **hparams)
        return _finish(label, contract, x_adv, x, threat)

    attack.contract = contract  # type: ignore[attr-defined]
    if name is not None:
        attack.__name__ = attack.__qualname__ = name
    return attack


def _check_arguments(name: str, contract: Contract, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> None:
    if threat.norm not in contract.norms:
        raise ValueError(f"{name} is an {' or '.join(contract.norms)} attack; got a {threat.norm} threat model")
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2):
        raise ValueError(f"{name}: x must be a floating-point batch of images (N, C, H, W)")
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape[:1]):
        shape = tuple(getattr(y, "shape", ()))
        raise ValueError(f"{name}: y must hold one label per image, shape ({x.shape[0]},); got {shape}")


def _finish(name: str, contract: Contract, x_adv: torch.Tensor, x: torch.Tensor,
            threat: ThreatModel) -> torch.Tensor:
    """The contract's output: detached, projected (or within budget), and checked (bench.types)."""
    if contract.minimum_norm:
        return checked_attack_output(name, x_adv, x, threat, lambda out: within_budget(out, x, threat))
    if not contract.projected:
        return checked_attack_output(name, x_adv, x, threat, lambda out: threat.project(out, x))
    return checked_attack_output(name, x_adv, x, threat)


_UNSET: Any = object()
# The functions register_attack made: ATTACKS takes no other (weak: a scratch registration may be dropped).
_TEMPLATED: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def register_attack(name: str, attack: Algorithm | None = None, *, norm: str, minimum_norm: bool = _UNSET,
                    eot: bool = False, projected: bool = _UNSET, idle: tuple[str, ...] | None = _UNSET,
                    registry: Registry = ATTACKS, **meta: Any):
    """Template `attack` for `norm` and register it as `name` with its metadata; a decorator when `attack` is omitted.

    `attack` is an algorithm (templated here with `minimum_norm`, `projected`, `idle`) or an attack
    already templated for several norms (e.g. `projected_gradient_descent`), whose contract is kept
    and restricted to `norm`. `eot` and any further `meta` keywords (preset_of, gradient_free, ...)
    go to the registry with norm and minimum_norm. Returns the registered function.
    """
    if attack is None:
        return functools.partial(register_attack, name, norm=norm, minimum_norm=minimum_norm, eot=eot,
                                 projected=projected, idle=idle, registry=registry, **meta)
    options: dict[str, Any] = {"minimum_norm": minimum_norm, "projected": projected, "idle": idle}
    contract: Contract | None = getattr(attack, "contract", None)
    if contract is not None:
        if norm not in contract.norms:
            raise ValueError(f"attack {name!r}: {attack.__name__} supports {contract.norms}, not {norm!r}")
        conflicting = [k for k, v in options.items() if v is not _UNSET and v != getattr(contract, k)]
        if conflicting:
            raise ValueError(f"attack {name!r}: {conflicting[0]} comes from {attack.__name__}'s template; "
                             "do not pass it again")
        options = {k: getattr(contract, k) for k in options}
        attack = contract.algorithm
    else:
        options = {"minimum_norm": False if minimum_norm is _UNSET else minimum_norm,
                   "projected": False if projected is _UNSET else projected,
                   "idle": None if idle is _UNSET else idle}
    function = templated(attack, norms=(norm,), name=name, **options)
    _TEMPLATED.add(function)
    registry.register(name, function, norm=norm, minimum_norm=function.contract.minimum_norm, eot=eot, **meta)
    return function


def check_attack(name: str, function: Any, info: AttackInfo) -> None:
    """Registration contract of ATTACKS: the entry came through `register_attack`, so the template wraps it."""
    if function not in _TEMPLATED:
        raise RegistrationError(f"attack {name!r} was registered with ATTACKS.register; register it with "
                                f"attacks.template.register_attack({name!r}, function, norm=...) instead (it adds "
                                "the norm check, the eps = 0 identity and the projection)")


ATTACKS.check = check_attack  # the registry imports nothing it registers: its contract is installed here
