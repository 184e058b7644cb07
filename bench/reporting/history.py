"""Regression tracking over time: chosen metrics.json values across a store's runs of one profile, oldest first,
with every drop that `compare` flags between consecutive complete runs marked REGRESSION."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from datetime import datetime, UTC
from typing import Any

import numpy as np
import pandas as pd

from bench.core.errors import UserError
from bench.execution.store import Store, StoreError
from bench.reporting.compare import compare_outcomes, run_outcomes
from bench.reporting.metrics import (SEPARATOR, accuracy_path, build_metrics, certified_path, flatten_metrics,
                                     robust_path)
from bench.reporting.report import run_frames
from bench.reporting.table_registry import tables
from bench.reporting.tables import percent_with_ci, to_text_left

__all__ = ["HISTORY_COLUMNS", "format_history", "run_history", "select_runs", "tested_paths"]

HISTORY_COLUMNS = ["metric", "run_id", "created", "profile", "git_commit", "package_version", "value", "low", "high",
                   "n", "status"]
INCOMPLETE = "incomplete"
# Tables whose cells `compare` tests: how a long-frame row becomes its metrics path (robust tests recall).
TESTED = {"accuracy": (accuracy_path, ()), "certified": (certified_path, ()), "robust": (robust_path, ("recall",))}
WORST_GROUP = SEPARATOR + "worst_case" + SEPARATOR


class HistoryError(UserError, ValueError):
    """A history that cannot be drawn: no runs of the profile, or a metric no run has."""


def select_runs(store: Store, profile: str | None = None, upto: str | None = None,
                last: int | None = None) -> tuple[str, list[str]]:
    """(profile, its run ids oldest first): `profile` (default: the latest run's), runs up to `upto`, the `last` N."""
    if last is not None and last < 1:
        raise HistoryError(f"--last must be at least 1, got {last}")
    runs = store.runs()
    if upto is not None:
        runs = runs[:runs.index(upto) + 1]
    if not runs:
        raise StoreError(f"{store.path} holds no runs")
    profiles = {run_id: store.run_info(run_id)["profile"] for run_id in runs}
    chosen = profile or profiles[runs[-1]]
    picked = [run_id for run_id in runs if profiles[run_id] == chosen]
    if not picked:
        raise HistoryError(f"no run of profile {chosen!r} in {store.path}; its profiles are "
                           f"{', '.join(sorted(set(profiles.values())))} (pass one with --profile)")
    return chosen, picked[-last:] if last else picked


def tested_paths(frames: dict[str, Any]) -> dict[tuple[str, str, str, str], str]:
    """`compare`'s key (table label, dataset, defense, column) of each tested table cell -> its metrics path.

    A table's outcomes and its long frame come from the same ordered flags (bench.reporting.tables*),
    so row i of the frame is outcome i.
    """
    run, out = frames["run"], {}
    for name, table in tables():
        if name not in TESTED or table.outcomes is None:
            continue
        path_of, tail = TESTED[name]
        for row, ((dataset, defense, column), _) in zip(frames[name].to_dict("records"), table.outcomes(run),
                                                        strict=True):
            assert (row["dataset"], row["defense"]) == (dataset, defense), (name, row, column)
            out[(table.compare_label or name, dataset, defense, column)] = SEPARATOR.join((*path_of(row), *tail))
    return out


def _lookup(flat: dict[str, Any], path: str) -> tuple[float, float, float, float]:
    """(value, low, high, n) of a metric in a flattened metrics.json: an accuracy leaf or a single number."""
    if path + SEPARATOR + "accuracy" in flat:
        values = [flat.get(path + SEPARATOR + k) for k in ("accuracy", "low", "high", "n")]
        return tuple(np.nan if v is None else float(v) for v in values)  # type: ignore[return-value]
    value = flat.get(path)
    return (np.nan if not isinstance(value, int | float) else float(value)), np.nan, np.nan, np.nan


def _leaf(path: str, seen: set[str]) -> str:
    """`path` without a trailing '/accuracy' when that names an accuracy leaf's value."""
    head, _, tail = path.rpartition(SEPARATOR)
    return head if tail == "accuracy" and path in seen and head + SEPARATOR + "low" in seen else path


def _known(flat: dict[str, Any], path: str) -> bool:
    return path in flat or path + SEPARATOR + "accuracy" in flat


def _check_metrics(metrics: list[str], seen: set[str], profile: str) -> None:
    # What a user names: accuracy leaves (not their low / high / n) and single numbers.
    leaves = {p.rsplit(SEPARATOR, 1)[0] for p in seen if p.endswith(SEPARATOR + "accuracy")}
    leaves |= {p for p in seen if p.rsplit(SEPARATOR, 1)[0] + SEPARATOR + "accuracy" not in seen}
    for path in metrics:
        if path not in seen and path + SEPARATOR + "accuracy" not in seen:
            close = difflib.get_close_matches(path, sorted(leaves), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise HistoryError(f"no run of profile {profile!r} has metric {path!r}; {hint}paths are those of a "
                               "run's metrics.json joined by '/', e.g. 'mnist5k/undefended/worst_case/l2@0.5' "
                               "(docs/metrics.md)")


def run_history(store: Store, *, profile: str | None = None, metrics: list[str] | None = None,
                upto: str | None = None, last: int | None = None, tolerance: float = 0.02, alpha: float = 0.05,
                prepare: Callable[[Store, str], None] | None = None) -> pd.DataFrame:
    """Long frame (HISTORY_COLUMNS): one row per metric and run of `profile`, metrics in the order given
    (default: every worst-case accuracy), runs oldest first.

    value/low/high/n: the accuracy leaf's numbers (NaN where the run lacks the metric; only value for
    a single number such as an overhead). status: `compare`'s verdict on the table cell against the
    profile's previous complete run with `tolerance` and `alpha` ("REGRESSION", "improved", "ok",
    "only in new"), "incomplete" for a run with cells missing, "" for the first run and untested
    metrics. `prepare(store, run_id)` runs before a run's tables are built (loading its plugins).
    """
    profile, run_ids = select_runs(store, profile, upto, last)
    points = []
    for run_id in run_ids:
        if prepare is not None:
            prepare(store, run_id)
        frames = run_frames(store, run_id)
        document = build_metrics(frames)
        points.append((run_id, frames["info"], flatten_metrics(document), document["run"]["complete"], frames))
    seen = {path for *_, flat, _, _ in points for path in flat}
    # A leaf's own "/accuracy" names the leaf: its interval and compare's verdict come with it.
    chosen = [_leaf(path, seen) for path in metrics] if metrics else sorted({p.rsplit(SEPARATOR, 1)[0] for p in seen
                                                   if WORST_GROUP in p and p.endswith(SEPARATOR + "accuracy")})
    if not chosen:
        raise HistoryError(f"the runs of profile {profile!r} have no worst-case accuracy (no attack ran); name "
                           "metrics with --metric, e.g. 'mnist5k/undefended/clean' (docs/metrics.md)")
    _check_metrics(chosen, seen, profile)
    statuses = _statuses(store, points, tolerance, alpha)
    rows = []
    for path in chosen:
        for run_id, info, flat, complete, _ in points:
            environment = info.get("environment") or {}
            status = statuses.get((run_id, path), "") if complete else INCOMPLETE
            rows.append({"metric": path, "run_id": run_id,
                         "created": datetime.fromtimestamp(info["created"], tz=UTC), "profile": profile,
                         "git_commit": environment.get("git_commit"),
                         "package_version": environment.get("package_version"),
                         **dict(zip(("value", "low", "high", "n"), _lookup(flat, path), strict=True)),
                         "status": status if _known(flat, path) else ""})
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def _statuses(store: Store, points: list[tuple], tolerance: float, alpha: float) -> dict[tuple[str, str], str]:
    """(run id, metrics path) -> `compare`'s status of that table cell against the previous complete run."""
    out: dict[tuple[str, str], str] = {}
    previous = None
    for run_id, _, _, complete, frames in points:
        if not complete:
            continue  # compare refuses incomplete runs: the next run is compared with the last complete one
        outcomes = run_outcomes(store, run_id)
        if previous is not None:
            paths = tested_paths(frames)
            frame = compare_outcomes(previous, outcomes, tolerance=tolerance, alpha=alpha)
            for row in frame.itertuples(index=False):
                path = paths.get((row.table, row.dataset, row.defense, row.column))
                if path is not None:
                    out[(run_id, path)] = row.status
        previous = outcomes
    return out


def _commit(value: Any) -> str:
    """A commit for a table cell: its first 12 hex digits (and '+dirty'), or '-' when not recorded."""
    if not value:
        return "-"
    commit, dirty, _ = str(value).partition("+")
    return commit[:12] + ("+dirty" if dirty else "")


def _value(row: Any) -> str:
    if not np.isfinite(row.value):
        return "-"
    return percent_with_ci(row.value, row.low, row.high) if np.isfinite(row.n) else f"{row.value:.4g}"


def format_history(frame: pd.DataFrame) -> str:
    """Terminal text: a line per metric and run (accuracies in % [95% CI]), regressions marked, a summary."""
    if frame.empty:
        return "no metrics to show\n"
    runs = frame["run_id"].nunique()
    display = pd.DataFrame({
        "metric": [m if i == 0 or m != frame["metric"].iloc[i - 1] else "" for i, m in enumerate(frame["metric"])],
        "run": frame["run_id"], "commit": [_commit(c) for c in frame["git_commit"]],
        "version": frame["package_version"].fillna("-"), "value": [_value(r) for r in frame.itertuples()],
        "n": ["-" if not np.isfinite(n) else f"{n:.0f}" for n in frame["n"]], "status": frame["status"]})
    regressions = int((frame["status"] == "REGRESSION").sum())
    return (f"history of profile {frame['profile'].iloc[0]}: {runs} run(s), oldest first; REGRESSION: a drop "
            "`compare` flags against the previous complete run\n" + to_text_left(display) + "\n"
            + f"{regressions} regression(s) in {frame['metric'].nunique()} metric(s)\n")
