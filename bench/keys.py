"""Cell keys: resolved parameters (signature defaults applied) plus fingerprints of the code that runs a cell.

A key changes exactly when a stored result could differ: a parameter or a default changes, or
the attack's code, the defense's code (class, architecture, training loop) or the harness code
that judges and records changes (bench.fingerprint). `provenance` keeps the parts apart so that
`run --dry-run` can say why a cell will be recomputed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
from collections.abc import Callable
from typing import Any

from bench import __version__
from bench.fingerprint import code_fingerprint
from bench.registry import ATTACKS, DATASETS, DEFENSES, MODELS
from bench.types import Cell, canonical_json

__all__ = ["resolve_attack_params", "resolve_defense_params", "defense_defaults", "check_types", "cell_code",
           "cell_key", "keyed", "model_code", "slot", "params_digest"]

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


def resolve_defense_params(defense: str, dataset: str, params: dict[str, Any]) -> dict[str, Any]:
    """Every constructor default of the defense (and of its bases and TrainConfig) overridden by `params`.

    Architecture and training settings are read back from a constructed instance, because
    defenses may choose them in code (e.g. the convex defense's own architecture and batch size).
    """
    cls = DEFENSES.get(defense)
    defaults = defense_defaults(defense)
    instance = cls(DATASETS.get(dataset), **params)
    resolved = defaults | cls.resolve_params(dict(params))
    resolved |= {"arch": instance.arch, "arch_params": dict(instance.arch_params)}
    resolved |= {f.name: _plain(getattr(instance.train_config, f.name))
                 for f in dataclasses.fields(instance.train_config)}
    return resolved


def defense_defaults(defense: str) -> dict[str, Any]:
    """Keyword defaults of the defense's constructor, its bases' and TrainConfig's (most derived wins)."""
    from bench.defense import TrainConfig  # late: bench.defense imports the model registry

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


def model_code(defense: str, params: dict[str, Any]) -> str:
    """Fingerprint of what builds and trains a defense's model: the defense class, its architecture
    (a registered one, or a user's `factory`), and the training loop."""
    import bench.training  # late: bench.training imports torch data utilities

    sources: list[Any] = [DEFENSES.get(defense), bench.training.fit]
    arch = params.get("arch")
    if isinstance(arch, str) and arch in MODELS:
        sources.append(MODELS.get(arch))
    factory = params.get("factory")
    if isinstance(factory, str) and ":" in factory:
        from bench.weights import import_factory  # late: bench.weights imports bench.config, which imports us

        sources.append(import_factory(factory))
    return code_fingerprint(*sources)


def _harness_code() -> str:
    from bench.runner import Runner  # late: the runner imports this module

    return code_fingerprint(Runner)


def cell_code(cell: Cell) -> dict[str, str]:
    """{"attack", "defense", "harness"}: fingerprints of the three pieces of code a cell's records depend on."""
    code = {"defense": model_code(cell.defense, cell.defense_params), "harness": _harness_code()}
    if cell.attack != "none":
        code["attack"] = code_fingerprint(ATTACKS.get(cell.attack))
    return code


def params_digest(cell: Cell) -> str:
    """Hash of the cell's full configuration (resolved parameters, examples, seed, caps)."""
    return hashlib.sha256(canonical_json(cell.config()).encode()).hexdigest()[:16]


def cell_key(cell: Cell, code: dict[str, str]) -> str:
    """SHA-256 (20 hex digits) of the configuration, the code fingerprints and the package version."""
    payload = canonical_json({"cell": cell.config(), "code": code, "version": __version__})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def slot(cell: Cell) -> tuple:
    """Where a cell sits in a profile's grid, whatever its parameters: used to explain recomputation."""
    return (cell.dataset, cell.defense_label, cell.attack_label, cell.norm, cell.eps)


def keyed(cells: list[Cell]) -> list[tuple[str, Cell]]:
    """Pair each cell with its key."""
    return [(cell_key(cell, cell_code(cell)), cell) for cell in cells]
