"""`Run`: a stored run read back as pandas DataFrames (tables, records, checks), and `load_run` to reopen one."""
from __future__ import annotations

import dataclasses
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from bench.cli.session import STORE_NAME, default_results_dir, load_run_plugins
from bench.reporting.check_ids import CheckWarning
from bench.reporting.checks import run_checks
from bench.reporting.compare import check_complete, compare_runs, open_run
from bench.profile.plugins import load_plugins
from bench.reporting.report import run_frames, write_report
from bench.execution.store import Store, StoreError
from bench.reporting.table_registry import tables
from bench.core.types import Record

__all__ = ["Run", "load_run"]

CELL_COLUMNS = ("dataset", "defense_label", "attack_label", "norm", "eps")
# Record.norm (the perturbation's size) is renamed: `norm` is the cell's threat norm, as in the tables.
RECORD_COLUMNS = tuple("perturbation_norm" if f.name == "norm" else f.name for f in dataclasses.fields(Record))


class Run:
    """One run of a results folder, read from its store (read-only): tables, records, checks, report, compare.

    Attributes:
        results: the results folder (holding store.sqlite and the run's report folder `results / run_id`).
        run_id: the run's id.
    """

    def __init__(self, results: str | os.PathLike, run_id: str, store: Store | None = None):
        self.results = Path(results)
        self.run_id = run_id
        self._store = store

    def __repr__(self) -> str:
        return f"Run({str(self.results)!r}, {self.run_id!r})"

    @property
    def store(self) -> Store:
        """The results store, opened read-only on first use."""
        if self._store is None:
            self._store = Store(self.results / STORE_NAME, readonly=True)
            load_run_plugins(self._store, self.run_id)  # tables read the registry entries of the run's plugins
        return self._store

    def close(self) -> None:
        """Close the store's connection (reopened, read-only, on the next use)."""
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def folder(self) -> Path:
        """The run's report folder (tables, figures, run.json, checks.txt)."""
        return self.results / self.run_id

    @cached_property
    def _frames(self) -> dict[str, Any]:
        return run_frames(self.store, self.run_id)

    @property
    def tables(self) -> dict[str, pd.DataFrame]:
        """Every registered table's long frame by table name ("accuracy", "certified", ...), the frame its CSV
        holds (`frame.to_csv(index=False, float_format="%.6g")` is the file); empty where the report writes none."""
        return {name: self._frames[name].copy() for name, _ in tables()}  # copies: the next call is unchanged

    @property
    def records(self) -> pd.DataFrame:
        """One row per example and cell, in the run's cell order: the cell's dataset, defense_label,
        attack_label, norm ("l2"/"linf"; None for clean cells) and eps, then the Record's fields (its
        `norm`, the perturbation's size, as perturbation_norm)."""
        rows = [(cell.dataset, cell.defense_label, cell.attack_label, cell.norm, cell.eps,
                 *dataclasses.astuple(record))
                for cell, records in self._frames["cells"] for record in records]
        return pd.DataFrame(rows, columns=[*CELL_COLUMNS, *RECORD_COLUMNS])

    @property
    def checks(self) -> list[CheckWarning]:
        """The sanity checks' warnings (gradient masking, non-monotone curves, ...), one line each; [] when all pass.

        Each is a str whose `.check` is the ID of its kind, the heading of its section in docs/checks.md.
        """
        run = self._frames["run"]
        return run_checks(run.cells, run.l_attack, run.infos)

    @property
    def text(self) -> str:
        """The report as the CLI prints it: every table, then the checks' warnings."""
        return write_report(self.store, self.run_id, None)["text"]

    def write_report(self, folder: str | os.PathLike) -> dict[str, Any]:
        """Write the report's files (tables as CSV, Markdown and LaTeX, figures, run.json, checks.txt and
        report.html, all of it on one self-contained page) into `folder`; returns the paths written, by table stem."""
        return write_report(self.store, self.run_id, Path(folder))["paths"]

    def compare(self, other: Run | str | os.PathLike, tolerance: float = 0.02,
                alpha: float = 0.05) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
        """This run against `other` as the base, like `pixeldp-bench compare OTHER THIS`.

        `other` is a Run, or what `compare` accepts: a run folder, results folder (its latest run) or
        baseline export. Returns `compare_outcomes`' frame (one row per table cell) and its
        REGRESSION rows as dicts (a significant drop of more than `tolerance` at level `alpha`).
        """
        base = (other.store, other.run_id) if isinstance(other, Run) else open_run(os.fspath(other), self.results)
        load_run_plugins(*base)
        for role, (store, run_id) in (("base", base), ("new", (self.store, self.run_id))):
            check_complete(role, store, run_id)
        frame, _ = compare_runs(base, (self.store, self.run_id), tolerance=tolerance, alpha=alpha)
        return frame, frame[frame["status"] == "REGRESSION"].to_dict("records")


def load_run(results: str | os.PathLike | None = None, run_id: str | None = None) -> Run:
    """Reopen a stored run read-only: `run_id` in the results folder `results` (default: the CLI's), or its
    latest run when `run_id` is None. `results` may also be a run folder (then `run_id` is its name)."""
    load_plugins()
    folder = Path(results).expanduser().resolve() if results is not None else default_results_dir()
    if run_id is None and not (folder / STORE_NAME).exists() and (folder.parent / STORE_NAME).exists():
        folder, run_id = folder.parent, folder.name  # a run folder
    if not (folder / STORE_NAME).is_file():
        raise StoreError(f"no results store at {folder / STORE_NAME}; pass the results folder a run was written to")
    store = Store(folder / STORE_NAME, readonly=True)
    if run_id is None:
        runs = store.runs()
        if not runs:
            raise StoreError(f"{store.path} holds no runs")
        run_id = runs[-1]
    store.run_info(run_id)  # raises listing the known runs when run_id is not one of them
    load_run_plugins(store, run_id)
    return Run(folder, run_id, store)
