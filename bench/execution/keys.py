"""Cell keys: resolved parameters (signature defaults applied) plus fingerprints of the code that runs a cell.

A key changes exactly when a stored result could differ: a parameter or a default changes, or
the attack's code, the defense's code (class, architecture, training loop) or the harness code
that judges and records changes (bench.execution.fingerprint), or the installed version of a library
the cell runs (torch always; bench.execution.library_versions). `provenance` keeps the parts apart so
that `run --dry-run` can say why a cell will be recomputed.
"""
from __future__ import annotations

import hashlib
from typing import Any

from bench import __version__
from bench.execution.fingerprint import code_fingerprint
from bench.execution.library_versions import cell_libraries
from bench.core.registry import ATTACKS, DEFENSES, MODELS
from bench.execution.training import fit
from bench.core.types import Cell, canonical_json
from bench.core.weights import import_factory

__all__ = ["cell_key", "model_code", "slot", "params_digest", "attack_code"]


def model_code(defense: str, params: dict[str, Any]) -> str:
    """Fingerprint of what builds and trains a defense's model: the defense class, its architecture
    (a registered one, or a user's `factory`), and the training loop."""
    sources: list[Any] = [DEFENSES.get(defense), fit]
    arch = params.get("arch")
    if isinstance(arch, str) and arch in MODELS:
        sources.append(MODELS.get(arch))
    factory = params.get("factory")
    if isinstance(factory, str) and ":" in factory:
        sources.append(import_factory(factory))
    return code_fingerprint(*sources)


def attack_code(cell: Cell) -> str:
    """Fingerprint of an attack cell's attack (runner.cell_code leaves it out of a clean cell's code)."""
    return code_fingerprint(ATTACKS.get(cell.attack))


def params_digest(cell: Cell) -> str:
    """Hash of the cell's full configuration (resolved parameters, examples, seed, caps)."""
    return hashlib.sha256(canonical_json(cell.config()).encode()).hexdigest()[:16]


def cell_key(cell: Cell, code: dict[str, str], libraries: dict[str, str] | None = None) -> str:
    """SHA-256 (20 hex digits) of the configuration, the code fingerprints, the package version and the
    versions of the libraries the cell runs (`libraries`; default: the installed ones, `cell_libraries`)."""
    versions = cell_libraries(cell) if libraries is None else libraries
    payload = canonical_json({"cell": cell.config(), "code": code, "version": __version__, "libraries": versions})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def slot(cell: Cell) -> tuple:
    """Where a cell sits in a profile's grid, whatever its parameters: used to explain recomputation."""
    return (cell.dataset, cell.defense_label, cell.attack_label, cell.norm, cell.eps)
