"""`history`: chosen metrics.json values across the stored runs of a profile, for regression tracking."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from bench.cli.session import STORE_NAME, default_results_dir, load_run_plugins
from bench.execution.store import Store, StoreError
from bench.profile.plugins import load_plugins
from bench.reporting.history import run_history
from bench.reporting.history_files import write_history

__all__ = ["history", "open_store"]


def open_store(results: str | os.PathLike | None) -> Store:
    """The results folder's store (or a store file), read-only; default: the CLI's results folder."""
    folder = Path(results).expanduser().resolve() if results is not None else default_results_dir()
    path = folder if folder.is_file() else folder / STORE_NAME
    if not path.is_file():
        raise StoreError(f"no results store at {path}; pass the results folder runs were written to")
    return Store(path, readonly=True)


def history(results: str | os.PathLike | None = None, metrics: list[str] | None = None, profile: str | None = None,
            *, last: int | None = None, tolerance: float = 0.02, alpha: float = 0.05,
            out: str | os.PathLike | None = None) -> pd.DataFrame:
    """Like `pixeldp-bench history`: one row per metric and run of `profile` (default: the latest run's), oldest
    first, with the run's git commit and package version and `compare`'s verdict against the previous run.

    `metrics` are metrics.json paths such as "mnist5k/undefended/worst_case/l2@0.5" (default: every
    worst-case accuracy); `last` keeps the latest N runs; `out` also writes history_<profile>.txt,
    .csv, .png and .pdf into that folder. Columns: bench.reporting.history.HISTORY_COLUMNS.
    """
    load_plugins()
    store = open_store(results)
    try:
        frame = run_history(store, profile=profile, metrics=metrics, last=last, tolerance=tolerance, alpha=alpha,
                            prepare=load_run_plugins)
    finally:
        store.close()
    if out is not None:
        write_history(frame, Path(out), f"history_{frame['profile'].iloc[0]}")
    return frame
