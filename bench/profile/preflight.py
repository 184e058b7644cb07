"""Checks every input a run needs (weights, factories, training budget, dataset splits) before anything is written."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from bench.profile.config import ConfigError, Profile
from bench.core.data import DatasetError, data_root, load_split, select_examples
from bench.core.defense import cell_defense, defense_memo
from bench.core.types import Cell
from bench.core.weights import WeightsError, file_sha256, resolve_path
from bench.core.zoo import locate_profile

__all__ = ["check_defenses", "check_inputs", "resolve_weights"]


def profile_folder(profile: str) -> Path | None:
    """The folder of a profile given as a file (relative weights resolve there); None for a shipped profile."""
    path = Path(profile)
    return path.resolve().parent if path.suffix == ".toml" or path.is_file() else None


def resolve_weights(params: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """`params` with `weights` made absolute (relative to `base`) and its SHA-256 added to the cell's parameters.

    The hash keys the cell, so new weights under the same path never reuse old results.
    """
    if not params.get("weights"):
        return params
    path = resolve_path(str(params["weights"]), base)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    return params | {"weights": str(path), "weights_sha256": file_sha256(path)}


def _check_defense(cell: Cell) -> bool:
    """Build the cell's defense; refuse an untrained model; load the user's weights and factory. True if it trains."""
    where = f"[defenses.{cell.defense_label}] on {cell.dataset}"
    defense = cell_defense(cell)
    if defense.weights is not None or defense.factory is not None:
        try:
            with torch.random.fork_rng(devices=[]):
                model = defense.starting_model()
            defense.check_model(model)
        except WeightsError as exc:
            raise WeightsError(f"{where}: {exc}") from exc
        except Exception as exc:  # the user's network does not fit the defense (e.g. no conv stem for PixelDP)
            raise ConfigError(f"{where}: the model cannot be used ({type(exc).__name__}: {exc})") from exc
    steps = defense.train_config.steps
    # --max-steps 0 (cell.max_steps == 0) is the user's explicit choice: the CLI warns instead.
    if steps == 0 and not defense.has_weights() and cell.max_steps != 0:
        raise ConfigError(f"{where} has steps = 0 and no weights, so it would be evaluated with random weights; "
                          "give weights = \"FILE\" (and factory = \"package.module:function\" for your own network) "
                          "or train it with steps > 0")
    cap = cell.max_steps
    return (steps if cap is None else min(steps, cap)) > 0


def check_defenses(cells: list[Cell]) -> dict[str, set[str]]:
    """Build each distinct defense of `cells` once: bad parameters, a user's model the defense cannot use or
    an untrained one are one line each. Returns {dataset: the splits its cells need ("test", and "train"
    where a defense trains)}."""
    splits: dict[str, set[str]] = {}
    checked: set[str] = set()
    for cell in cells:
        needed = splits.setdefault(cell.dataset, {"test"})
        memo = defense_memo(cell)
        if memo in checked:
            continue
        checked.add(memo)
        if _check_defense(cell):
            needed.add("train")
    return splits


def check_inputs(profile: Profile, args: argparse.Namespace) -> Profile:
    """Locate zoo weights (bench.core.zoo) and resolve weight paths against the profile's folder, then check every
    defense and dataset split the profile needs (test always, train only where a defense trains); returns the
    profile with resolved cells.

    Called by `run` right after the profile is read: a problem is one ConfigError / DatasetError line
    before any cell is registered or any run folder created.
    """
    base = profile_folder(args.profile)
    # Zoo weights ("zoo:NAME"): --weights-root, $PIXELDP_BENCH_WEIGHTS, the cache, or --download; hash verified.
    profile = locate_profile(profile, getattr(args, "weights_root", None), bool(getattr(args, "download", False)))
    resolved: dict[str, dict[str, Any]] = {}
    cells = []
    for cell in profile.cells:
        memo = repr(sorted(cell.defense_params.items()))
        if memo not in resolved:
            try:
                resolved[memo] = resolve_weights(cell.defense_params, base)
            except WeightsError as exc:
                raise WeightsError(f"[defenses.{cell.defense_label}]: {exc}") from exc
        cells.append(dataclasses.replace(cell, defense_params=resolved[memo]))
    splits = check_defenses(cells)
    root = data_root(getattr(args, "data_root", None))
    for dataset, needed in splits.items():
        for split in sorted(needed, key=lambda s: s != "test"):
            loaded = load_split(dataset, split, root, bool(getattr(args, "download", False)))
            if split == "test":
                for examples, seed in sorted({(c.examples, c.seed) for c in cells if c.dataset == dataset}):
                    try:
                        select_examples(loaded, examples, seed)
                    except DatasetError as exc:
                        raise DatasetError(f"{dataset} test split: {exc}") from exc
    return dataclasses.replace(profile, cells=cells)
