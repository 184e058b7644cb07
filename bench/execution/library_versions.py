"""Installed library versions: what a run records, and the part of a cell's key that names the libraries it runs.

A cell's records depend on torch (every cell), on the libraries its attack or defense declares
(`libraries=` in its registry info, e.g. torchattacks for `*@torchattacks`), and on the installed
package of a plugin, a user's `factory` or a plugin's architecture when they come from one. Versions
are read from the installed distributions' metadata (importlib.metadata): nothing heavy is imported.
"""
from __future__ import annotations

import importlib.metadata
from functools import cache
from typing import Any

from bench.core.registry import ATTACKS, DEFENSES, MODELS
from bench.core.types import Cell

__all__ = ["NOT_INSTALLED", "RECORDED", "cell_libraries", "distribution_of", "installed_versions",
           "library_version"]

NOT_INSTALLED = "not installed"

# The distributions a run's environment lists (bench.execution.environment), installed or not.
RECORDED = ("torch", "torchvision", "torchattacks", "adversarial-robustness-toolbox", "numpy", "scipy", "safetensors")

# Import packages of the harness itself: its own version (bench.__version__) is in every key already.
_OWN_PACKAGES = frozenset({"attacks", "bench", "defenses", "pixeldp_bench"})


@cache
def _metadata_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def library_version(distribution: str) -> str:
    """The installed version of `distribution` (a pip name), or "not installed"."""
    return _metadata_version(distribution)


def installed_versions(distributions: tuple[str, ...] = RECORDED) -> dict[str, str]:
    """{distribution: version or "not installed"} for `distributions`."""
    return {name: library_version(name) for name in distributions}


@cache
def _package_distributions() -> dict[str, list[str]]:
    # Scans every installed distribution (most of a second): done once, and only for code from outside the harness.
    return dict(importlib.metadata.packages_distributions())


def distribution_of(module: str) -> str | None:
    """The installed distribution providing module `module` (dotted name), or None (the harness, or not installed)."""
    top = module.split(".")[0]
    if not top or top in _OWN_PACKAGES:
        return None
    providers = sorted(_package_distributions().get(top, []))
    return providers[0] if providers else None


def _code_modules(cell: Cell) -> list[str]:
    """Modules holding the code a cell runs besides the harness: its attack, its defense, a registered
    architecture and a user's `factory` (any of them may come from an installed package)."""
    modules = [DEFENSES.get(cell.defense).__module__] if cell.defense in DEFENSES else []
    if cell.attack in ATTACKS:
        modules.append(ATTACKS.get(cell.attack).__module__)
    arch, factory = cell.defense_params.get("arch"), cell.defense_params.get("factory")
    if isinstance(arch, str) and arch in MODELS:
        modules.append(MODELS.get(arch).__module__)
    for target in (arch, factory):
        if isinstance(target, str) and ":" in target:  # "package.module:function" (arch may name a factory too)
            modules.append(target.partition(":")[0])
    return modules


def cell_libraries(cell: Cell) -> dict[str, str]:
    """{distribution: version} of the libraries a cell's records depend on: torch, the declared ones of its
    attack and defense, and the distributions its attack, defense or model code comes from.

    A name that is not registered (a stored cell of an unloaded plugin) declares nothing: torch remains.
    """
    names: list[Any] = ["torch"]
    if cell.defense in DEFENSES:
        names += DEFENSES.info(cell.defense).libraries
    if cell.attack in ATTACKS:
        names += ATTACKS.info(cell.attack).libraries
    names += [d for d in map(distribution_of, _code_modules(cell)) if d is not None]
    return {name: library_version(name) for name in sorted(set(names))}
