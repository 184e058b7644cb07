"""The tables of a run, each one small object registered in TABLES; report, compare and plots iterate over it.

A new table is one `Table(...)` and one `TABLES.register(name, table)`: `write_report` writes it
(CSV, Markdown, LaTeX) and prints it, `compare` tests its per-example outcomes (when it has any),
and figures read its frame by name (locuslab/smoothing's analyze.py keeps tables as plug-ins too).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from bench.core.registry import Registry
from bench.reporting.tables import ACCURACY_CAPTION, CLEAN, accuracy_flags, accuracy_frame, accuracy_pivot
from bench.reporting.tables_certified import (CERTIFIED_CAPTION, DEFAULT_ROBUST_THRESHOLDS, ROBUST_CAPTION,
                                              certified_flags, certified_frame, certified_pivot, clean_cells,
                                              is_certified, robust_flags, robust_frame, robust_pivot)
from bench.reporting.tables_overhead import overhead_caption, overhead_frame, overhead_pivot
from bench.reporting.tables_published import PUBLISHED_CAPTION, published_frame, published_pivot
from bench.core.types import Cell, Record

__all__ = ["RunData", "Table", "TABLES", "tables", "build_frames"]

Outcome = tuple[tuple[str, str, str], dict[int, bool]]  # ((dataset, defense label, column), {index: ok})


@dataclass
class RunData:
    """Everything a table is built from: a run's (cell, records) pairs, their stored infos and settings."""

    cells: list[tuple[Cell, list[Record]]]
    settings: dict[str, Any]
    infos: list[dict[str, Any] | None] = field(default_factory=list)
    device: str = ""
    robust_thresholds: tuple[float, ...] = DEFAULT_ROBUST_THRESHOLDS

    def __post_init__(self) -> None:
        if not self.infos:
            self.infos = [None] * len(self.cells)

    @property
    def l_attack(self) -> dict[str, list[float]]:
        return self.settings["l_attack"]

    @property
    def certified_defenses(self) -> set[tuple[str, str]]:
        """(dataset, defense label) of every defense whose clean cell carries radii."""
        return {key for key, (_, records) in clean_cells(self.cells).items() if is_certified(records)}


@dataclass(frozen=True)
class Table:
    """One table of a run.

    Attributes:
        stem: file stem of `<stem>.csv` (long frame), `.md` and `.tex` (wide display).
        build: RunData -> long frame (one row per table entry, machine-readable).
        pivot: (long frame, every table's long frame by name, RunData) -> wide display frame.
        caption: RunData -> caption of the Markdown / LaTeX table and of the printed table.
        heading: printed above the terminal text instead of the caption (None: the caption).
        outcomes: RunData -> per-example binary outcomes ((dataset, defense, column), {index: ok})
            that `compare` tests for regressions; None when the table has none (e.g. timings).
        compare_label: the table's name in `compare`'s output.
        write_empty: write (and print) the table even when the run gives it no rows.
        order: position in reports (smaller first).
    """

    stem: str
    build: Callable[[RunData], pd.DataFrame]
    pivot: Callable[[pd.DataFrame, dict[str, pd.DataFrame], RunData], pd.DataFrame]
    caption: Callable[[RunData], str]
    heading: str | None = None
    outcomes: Callable[[RunData], Iterable[Outcome]] | None = None
    compare_label: str = ""
    write_empty: bool = False
    order: int = 100


TABLES = Registry("table")


def tables() -> list[tuple[str, Table]]:
    """(name, table) of every registered table, in report order."""
    return sorted(((name, TABLES.get(name)) for name in TABLES.names()), key=lambda item: item[1].order)


def build_frames(run: RunData) -> dict[str, pd.DataFrame]:
    """Every table's long frame, by table name."""
    return {name: table.build(run) for name, table in tables()}


def _column(attack: str, norm: str, eps: float) -> str:
    return CLEAN if attack == CLEAN else f"{attack} {norm}={eps:g}"


def _accuracy_outcomes(run: RunData) -> Iterable[Outcome]:
    for (dataset, defense, attack, norm, eps), flags in accuracy_flags(run.cells, run.l_attack).items():
        yield (dataset, defense, _column(attack, norm, eps)), flags


def _certified_outcomes(run: RunData) -> Iterable[Outcome]:
    for (dataset, defense, certifier, norm, t), flags in certified_flags(
            run.cells, run.settings.get("thresholds", [])).items():
        yield (dataset, defense, f"{norm} T={t:g} ({certifier})".strip()), flags


def _robust_outcomes(run: RunData) -> Iterable[Outcome]:
    for (dataset, defense, certifier, attack, norm, eps, t), (_, correct) in robust_flags(
            run.cells, run.l_attack, run.robust_thresholds).items():
        yield (dataset, defense, f"{attack} {norm}={eps:g} T={t:g} ({certifier})"), correct


TABLES.register("accuracy", Table(
    stem="accuracy_under_attack", order=10, write_empty=True,
    build=lambda run: accuracy_frame(run.cells, run.l_attack),
    pivot=lambda long, frames, run: accuracy_pivot(long),
    caption=lambda run: ACCURACY_CAPTION, heading="Accuracy under attack, % [95% Clopper-Pearson interval]",
    outcomes=_accuracy_outcomes, compare_label="accuracy"))
TABLES.register("certified", Table(
    stem="certified_accuracy", order=20,
    build=lambda run: certified_frame(run.cells, run.settings.get("thresholds", [])),
    pivot=lambda long, frames, run: certified_pivot(long),
    caption=lambda run: CERTIFIED_CAPTION, outcomes=_certified_outcomes, compare_label="certified accuracy"))
TABLES.register("published", Table(
    stem="published_vs_measured", order=25,
    build=lambda run: published_frame(run.cells),
    pivot=lambda long, frames, run: published_pivot(long),
    caption=lambda run: PUBLISHED_CAPTION, heading="Published vs measured (zoo checkpoints), error %"))
TABLES.register("robust", Table(
    stem="robust_precision_recall", order=30,
    build=lambda run: robust_frame(run.cells, run.l_attack, tuple(run.robust_thresholds)),
    pivot=lambda long, frames, run: robust_pivot(long, frames["accuracy"], run.certified_defenses),
    caption=lambda run: ROBUST_CAPTION, outcomes=_robust_outcomes, compare_label="robust recall"))
TABLES.register("overhead", Table(
    stem="overhead", order=40,
    build=lambda run: overhead_frame([(c, r, i) for (c, r), i in zip(run.cells, run.infos, strict=True)],
                                     run.device),
    pivot=lambda long, frames, run: overhead_pivot(long),
    caption=lambda run: overhead_caption(run.device)))
