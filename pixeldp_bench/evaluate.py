"""`pixeldp_bench.evaluate`: a tensor batch under attacks, through the cells and runner a profile run uses."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from bench.cli.session import read_profile, results_folder
from bench.profile.config import ConfigError
from bench.core.devices import pick_device
from bench.execution.runner import keyed
from bench.profile.plugins import load_plugins
from bench.profile.preflight import check_defenses, resolve_weights
from bench.core.registry import DATASETS
from bench.execution.runner import Runner, RunOptions
from bench.execution.store import STORE_NAME, Store
from bench.core.types import Cell
from pixeldp_bench.memory import register_models
from pixeldp_bench.runs import CELL_COLUMNS, RECORD_COLUMNS

__all__ = ["evaluate"]

LABEL = "model"  # the model's label in the profile evaluate builds (and its defense_label)


class _GivenExamples(Runner):
    """The runner with the caller's tensors as every cell's test examples (indices 0..n-1)."""

    def __init__(self, store: Store, options: RunOptions, x: torch.Tensor, y: torch.Tensor):
        super().__init__(store, options, log=lambda message: None)
        self.given = (torch.arange(len(y)), x, y)

    def test_examples(self, cell: Cell) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.given


def _check_batch(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 (N, C, H, W) in [0,1], y int64 (N,)), or a one-line ConfigError naming the fix."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ConfigError(f"x and y must be torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4 or len(x) == 0:
        raise ConfigError(f"x must be a non-empty batch of images (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ConfigError(f"x must be a float tensor in [0, 1], got {x.dtype}; divide uint8 images by 255")
    if not bool(torch.isfinite(x).all()):
        raise ConfigError("x holds NaN or infinite values")
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ConfigError(f"x must lie in [0, 1] (got [{float(x.min()):g}, {float(x.max()):g}]); the model "
                          "normalizes inside its forward")
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool:
        raise ConfigError(f"y must be integer labels of shape ({len(x)},), got {y.dtype} of shape {tuple(y.shape)}")
    return x.detach().float().cpu(), y.detach().long().cpu()


def _dataset(x: torch.Tensor, y: torch.Tensor, name: str | None) -> str:
    """The registered dataset whose image shape and classes fit the batch (its spec drives defenses and keys)."""
    shape = tuple(x.shape[1:])
    names = [name] if name is not None else sorted(DATASETS.names(), key=lambda n: (n != "mnist5k", n))
    for candidate in names:
        spec = DATASETS.get(candidate)
        if tuple(spec.shape) == shape and int(y.min()) >= 0 and int(y.max()) < spec.classes:
            return candidate
    raise ConfigError(f"no registered dataset has images of shape {shape} and labels 0..{int(y.max())}"
                      + (f" ({name!r} does not fit)" if name is not None else "; register one (bench.core.data)"))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
             attacks: Sequence[str] | Mapping[str, Mapping[str, Any]] = ("pgd_linf",),
             eps: float | Sequence[float] = 0.1,
             defense: str | None = "user_model", defense_params: Mapping[str, Any] | None = None,
             dataset: str | None = None, device: str = "auto", seed: int = 0,
             results: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per example and cell (clean included) for `model` on the batch (x in [0,1], y labels), with
    the columns of `Run.records`; `index` is the row of x.

    The cells are those of a profile with `defense` (None: "user_model") given `model = ...`, the
    `attacks` (names, or {name: params}) at `eps`, `examples = len(x)` and `seed`, evaluated by the
    runner a run uses: on the examples a profile run draws, the records are that run's. `dataset` names
    the registered dataset the batch is from (default: the first whose shape and classes fit); the
    weights go into `results`' model cache (default: the CLI's results folder), nothing else is stored.
    """
    load_plugins()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x, y = _check_batch(x, y)
    name = _dataset(x, y, dataset)
    budgets = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if isinstance(attacks, str):
        raise ConfigError(f"attacks must be a list of names, got the string {attacks!r}; pass [{attacks!r}]")
    chosen = dict(attacks) if isinstance(attacks, Mapping) else {str(a): {} for a in attacks}
    profile = {"run": {"datasets": [name], "examples": len(y), "seed": seed},
               "defenses": {LABEL: {"defense": defense or "user_model",
                                    "params": dict(defense_params or {}) | {"factory": "memory:" + LABEL}}},
               "attacks": {a: {"eps": budgets, "params": dict(p)} for a, p in chosen.items()}}
    folder = results_folder(results, write=True)
    resolved = register_models(read_profile(profile), {LABEL: model}, lambda: folder / "models" / "memory")
    cells = [dataclasses.replace(c, defense_params=resolve_weights(c.defense_params, None)) for c in resolved.cells]
    check_defenses(cells)  # the run route's checks of each defense and model, in one line each
    run_device = pick_device(device)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:  # the runner's store: nothing is trained, nothing kept
        store = Store(Path(scratch) / STORE_NAME)
        try:
            runner = _GivenExamples(store, RunOptions(results_dir=folder, device=str(run_device), progress=False,
                                                      batch_size=resolved.batch_size), x, y)
            for key, cell in keyed(cells):
                records, _ = runner.run_cell(cell, key)
                rows += [(cell.dataset, cell.defense_label, cell.attack_label, cell.norm, cell.eps,
                          *dataclasses.astuple(record)) for record in records]
        finally:
            store.close()
    return pd.DataFrame(rows, columns=[*CELL_COLUMNS, *RECORD_COLUMNS])
