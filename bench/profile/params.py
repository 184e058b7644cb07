"""Parameter resolution: what an attack or a defense really runs with (signature defaults applied), and type checks.

Profiles (bench.profile.config) validate with these, and cell keys (bench.execution.keys) hash their result.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from bench.core.defense import TrainConfig, build_defense
from bench.core.registry import ATTACKS, DEFENSES
from bench.core.input_normalization import NORMALIZATION_PARAMS

__all__ = ["RUNNER_ARGUMENTS", "resolve_attack_params", "resolve_defense_params", "defense_defaults", "check_types"]

# Arguments the runner passes itself; they are not hyperparameters.
RUNNER_ARGUMENTS = {"threat", "generator"}


def _keyword_defaults(function: Callable) -> dict[str, Any]:
    """{name: default} of a callable's keyword parameters that have defaults."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
            and name not in RUNNER_ARGUMENTS}


def resolve_attack_params(attack: str, params: dict[str, Any]) -> dict[str, Any]:
    """The attack's keyword defaults overridden by `params`: what the attack will really run with."""
    return _keyword_defaults(ATTACKS.get(attack)) | dict(params)


def resolve_defense_params(defense: str, dataset: str, params: dict[str, Any], where: str) -> dict[str, Any]:
    """Every constructor default of the defense (and of its bases and TrainConfig) overridden by `params`.

    Architecture and training settings are read back from a constructed instance, because
    defenses may choose them in code (e.g. the convex defense's own architecture and batch size);
    bad parameters are one ConfigError naming `where` (bench.defense.build_defense).
    """
    cls = DEFENSES.get(defense)
    defaults = defense_defaults(defense)
    instance = build_defense(defense, dataset, params, where)
    resolved = defaults | cls.resolve_params(dict(params))
    # Unset, the input normalization stays out of the cell's parameters: they are what they were before it existed.
    resolved = {k: v for k, v in resolved.items() if not (k in NORMALIZATION_PARAMS and v is None)}
    resolved |= {"arch": instance.arch, "arch_params": dict(instance.arch_params)}
    resolved |= {f.name: _plain(getattr(instance.train_config, f.name))
                 for f in dataclasses.fields(instance.train_config)}
    return resolved


def defense_defaults(defense: str) -> dict[str, Any]:
    """Keyword defaults of the defense's constructor, its bases' and TrainConfig's (most derived wins)."""
    cls = DEFENSES.get(defense)
    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass is not object:
            defaults |= {k: v for k, v in _keyword_defaults(klass.__init__).items() if k != "spec"}
    return defaults


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_types(params: dict[str, Any], defaults: dict[str, Any], where: str) -> list[str]:
    """Messages for values whose type does not match their default's (e.g. steps = "five")."""
    problems = []
    for name, value in params.items():
        if name not in defaults or defaults[name] is None or value is None:
            continue
        default = defaults[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        elif isinstance(default, (list, tuple)):
            ok = isinstance(value, (list, tuple))
        elif isinstance(default, dict):
            ok = isinstance(value, dict)
        else:
            ok = True
        if not ok:
            problems.append(f"{where}: parameter {name!r} = {value!r} should be a {type(default).__name__} "
                            f"(default {default!r})")
    return problems
