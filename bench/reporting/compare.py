"""Regression tracking: two runs lined up example by example, each table cell tested for a significant drop."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest, fisher_exact

from bench.reporting.baseline import load_export
from bench.reporting.report import run_data
from bench.execution.store import STORE_NAME, Store, StoreError
from bench.reporting.table_registry import tables
from bench.reporting.tables_certified import DEFAULT_ROBUST_THRESHOLDS
from bench.core.types import Cell

BASELINE_NAME = "baseline.json"


@dataclass
class Outcomes:
    """Per-example binary outcomes of every table cell of one run, plus its cell configurations."""

    flags: OrderedDict[tuple[str, str, str, str], dict[int, bool]]  # (table, dataset, defense, column) -> {index: ok}
    cells: dict[tuple, Cell]  # (dataset, defense label, attack label, eps) -> cell


def open_run(spec: str, results: Path) -> tuple[Store, str]:
    """A run given as a run id (in `results`), a run folder (its parent holds store.sqlite), a results
    folder or store file (its latest run), or an exported baseline (a .json file or a folder holding
    baseline.json)."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        return load_export(path)
    if path.is_dir() and (path / BASELINE_NAME).exists() and not (path / STORE_NAME).exists():
        return load_export(path / BASELINE_NAME)
    if path.is_file() and path.suffix == ".sqlite":
        store = Store(path, readonly=True)
    elif path.is_dir() and (path / STORE_NAME).exists():
        store = Store(path / STORE_NAME, readonly=True)
    elif (path.is_dir() or len(path.parts) > 1) and (path.resolve().parent / STORE_NAME).exists():
        store = Store(path.resolve().parent / STORE_NAME, readonly=True)
        return store, path.resolve().name
    elif (results / STORE_NAME).exists():
        store = Store(results / STORE_NAME, readonly=True)
        store.run_info(spec)  # raises listing the known runs when spec is not one of them
        return store, spec
    else:
        raise StoreError(f"cannot find run {spec!r}: not a run folder, results folder, store file or baseline "
                         f"export, and {results / STORE_NAME} does not exist")
    runs = store.runs()
    if not runs:
        raise StoreError(f"{store.path} holds no runs")
    return store, runs[-1]


def check_complete(role: str, store: Store, run_id: str) -> None:
    """Refuse to compare a run with cells missing (killed or failed): its tables would lack them."""
    missing = store.missing_cells(run_id)
    if missing:
        names = "; ".join(c.label() for _, c in missing[:5])
        raise StoreError(f"{role} run {run_id} is incomplete: {len(missing)} cell(s) missing ({names}"
                         f"{'; ...' if len(missing) > 5 else ''}); finish it by re-running its profile, "
                         "then compare")


def run_outcomes(store: Store, run_id: str, robust_thresholds=DEFAULT_ROBUST_THRESHOLDS) -> Outcomes:
    """Every per-example binary outcome behind the registered tables that have them (bench.reporting.table_registry):
    accuracy (and worst case), certified accuracy at each T, robust recall at each (L_attack, T), ..."""
    run = run_data(store, run_id, robust_thresholds, infos=False)
    flags: OrderedDict[tuple[str, str, str, str], dict[int, bool]] = OrderedDict()
    for name, table in tables():
        if table.outcomes is not None:
            for (dataset, defense, column), per_example in table.outcomes(run):
                flags[(table.compare_label or name, dataset, defense, column)] = per_example
    by_label = {(c.dataset, c.defense_label, c.attack_label, c.eps): c for c, _ in run.cells}
    return Outcomes(flags, by_label)


def config_differences(base: Outcomes, new: Outcomes) -> list[str]:
    """Human-readable differences between the configurations of cells both runs share."""
    notes = []
    for key in base.cells.keys() & new.cells.keys():
        a, b = base.cells[key].config(), new.cells[key].config()
        changed = {k: (a[k], b[k]) for k in a if a[k] != b.get(k)}
        if changed:
            what = ", ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in sorted(changed.items()))
            notes.append(f"{base.cells[key].label()}: {what}")
    return sorted(notes)


def paired_test(base: dict[int, bool], new: dict[int, bool]) -> tuple[str, float]:
    """McNemar's exact test on the same examples; Fisher's exact two-proportion test otherwise."""
    if base.keys() == new.keys():
        discordant_lost = sum(1 for i in base if base[i] and not new[i])
        discordant_won = sum(1 for i in base if new[i] and not base[i])
        total = discordant_lost + discordant_won
        if total == 0:
            return "mcnemar", 1.0
        return "mcnemar", float(binomtest(min(discordant_lost, discordant_won), total, 0.5).pvalue)
    k1, n1, k2, n2 = sum(base.values()), len(base), sum(new.values()), len(new)
    return "fisher", float(fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error over all compared table cells)."""
    m = len(p_values)
    order = np.argsort(p_values)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def compare_outcomes(base: Outcomes, new: Outcomes, *, tolerance: float = 0.02, alpha: float = 0.05,
                     correction: str = "holm") -> pd.DataFrame:
    """One row per table cell of either run: proportions, change, test, p-value and status.

    Status is "REGRESSION" when the new proportion is lower by more than `tolerance` and the
    (Holm-adjusted) p-value is below `alpha`; "improved" for the mirror case; "only in base" /
    "only in new" for cells one run lacks; "ok" otherwise.
    """
    rows = []
    for key in list(base.flags) + [k for k in new.flags if k not in base.flags]:
        row: dict[str, Any] = dict(zip(("table", "dataset", "defense", "column"), key, strict=True))
        a, b = base.flags.get(key), new.flags.get(key)
        row |= {"n_base": len(a) if a else 0, "n_new": len(b) if b else 0,
                "base": np.mean(list(a.values())) if a else np.nan, "new": np.mean(list(b.values())) if b else np.nan}
        if a and b:
            row["test"], row["p_value"] = paired_test(a, b)
        else:
            row["test"], row["p_value"] = "-", np.nan
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["table", "dataset", "defense", "column", "n_base", "n_new", "base", "new",
                                        "test", "p_value"])
    frame["delta"] = frame["new"] - frame["base"]
    tested = frame["p_value"].notna().to_numpy()
    frame["p_adjusted"] = np.nan
    if tested.any():
        p = frame.loc[tested, "p_value"].to_numpy(dtype=float)
        frame.loc[tested, "p_adjusted"] = holm(p) if correction == "holm" else p
    significant = frame["p_adjusted"] < alpha
    frame["status"] = np.select(
        [frame["n_new"] == 0, frame["n_base"] == 0, significant & (frame["delta"] < -tolerance),
         significant & (frame["delta"] > tolerance)],
        ["only in base", "only in new", "REGRESSION", "improved"], default="ok")
    return frame


def only_common(frame: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """The rows both runs have, and how many were only in the base / only in the new run."""
    in_base, in_new = frame["status"] == "only in base", frame["status"] == "only in new"
    return frame[~(in_base | in_new)].reset_index(drop=True), int(in_base.sum()), int(in_new.sum())


def missing_from_new(frame: pd.DataFrame, shown: int = 5) -> str | None:
    """One line naming the base's table cells the new run lacks (None when it has them all).

    A regression gate that passes on a run covering a fraction of the baseline proves nothing, so
    the CLI fails on this unless the user asks for the intersection (--only-common).
    """
    lacking = frame[frame["status"] == "only in base"]
    if lacking.empty:
        return None
    names = "; ".join(f"{r.table} / {r.dataset} / {r.defense} / {r.column}" for r in lacking.head(shown).itertuples())
    more = f"; ... ({len(lacking) - shown} more)" if len(lacking) > shown else ""
    return (f"the new run lacks {len(lacking)} of the base's {int((frame['status'] != 'only in new').sum())} "
            f"table cells ({names}{more}); run the base's whole profile, or pass --only-common to compare "
            "only the cells both runs have")


def format_comparison(frame: pd.DataFrame, notes: list[str], *, everything: bool = False,
                      left_out: tuple[int, int] | None = None) -> str:
    """Terminal text: the changed (or all) table cells, the configuration differences, a summary line.

    `left_out` (only in base, only in new) says the frame was cut to the common cells (--only-common).
    """
    shown = frame if everything else frame[(frame["delta"].fillna(1) != 0) | (frame["status"] != "ok")]
    text = ""
    if len(shown):
        display = shown.assign(base=[f"{100 * v:.1f}" if np.isfinite(v) else "-" for v in shown["base"]],
                               new=[f"{100 * v:.1f}" if np.isfinite(v) else "-" for v in shown["new"]],
                               delta=[f"{100 * v:+.1f}" if np.isfinite(v) else "-" for v in shown["delta"]],
                               p_value=[f"{v:.3g}" if np.isfinite(v) else "-" for v in shown["p_value"]],
                               p_adjusted=[f"{v:.3g}" if np.isfinite(v) else "-" for v in shown["p_adjusted"]])
        text += display.to_string(index=False) + "\n"
    if notes:
        text += "configuration differences of shared cells:\n" + "".join(f"  {n}\n" for n in notes)
    counts = frame["status"].value_counts()
    text += (f"{len(frame)} table cells compared (in %): {counts.get('REGRESSION', 0)} regression(s), "
             f"{counts.get('improved', 0)} improvement(s), {counts.get('ok', 0)} within tolerance, "
             f"{counts.get('only in base', 0)} only in base, {counts.get('only in new', 0)} only in new\n")
    if left_out is not None:
        text += (f"--only-common: compared only the {len(frame)} table cells both runs have; left out "
                 f"{left_out[0]} only in the base and {left_out[1]} only in the new run\n")
    return text


def compare_runs(base: tuple[Store, str], new: tuple[Store, str], **options) -> tuple[pd.DataFrame, list[str]]:
    """Compare two (store, run id) pairs; returns the per-cell frame and the configuration notes."""
    robust_thresholds = options.pop("robust_thresholds", None) or DEFAULT_ROBUST_THRESHOLDS
    a = run_outcomes(*base, robust_thresholds=robust_thresholds)
    b = run_outcomes(*new, robust_thresholds=robust_thresholds)
    return compare_outcomes(a, b, **options), config_differences(a, b)
