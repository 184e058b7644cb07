"""metrics.json: a run's headline numbers as one small nested JSON document with stable keys (docs/metrics.md).

Everything in it comes from the tables the report already built (bench.reporting.table_registry frames),
so it never says more than the tables; `diff_metrics` lines two of them up, path by path.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.core.errors import UserError
from bench.reporting.tables import CLEAN, WORST, to_text_left

__all__ = ["METRICS_NAME", "MetricsError", "SCHEMA_VERSION", "accuracy_path", "build_metrics", "certified_path",
           "diff_metrics", "flatten_metrics", "format_diff", "metrics_text", "read_metrics", "robust_path"]

SCHEMA_VERSION = 1  # raised only when a key changes meaning or moves; new keys may appear within a version
METRICS_NAME = "metrics.json"
SEPARATOR = "/"  # joins keys into the paths that `history` and `metrics diff` print
DIGITS = 6  # significant digits of every number: a rerun's file differs only where a value does


class MetricsError(UserError, ValueError):
    """A metrics.json file that is missing, unreadable or of another schema."""


def rounded(value: Any) -> float | None:
    """`value` to 6 significant digits; None for a missing or undefined number (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return float(f"{value:.{DIGITS}g}") if math.isfinite(value) else None


def number_key(value: float) -> str:
    """A budget or threshold in a key: 6 significant digits, always with a '.' or exponent ('1.0', '0.05')."""
    return repr(rounded(value))


def proportion(value: Any, low: Any, high: Any, n: Any) -> dict[str, Any]:
    """One proportion with its 95% Clopper-Pearson interval and denominator: the shape of every accuracy leaf."""
    return {"accuracy": rounded(value), "low": rounded(low), "high": rounded(high), "n": int(n)}


def accuracy_path(row: dict[str, Any]) -> tuple[str, ...]:
    """Keys of one accuracy-table row: (dataset, defense, "clean"), (..., "attacks", "<attack>@<eps>") or
    (..., "worst_case", "<norm>@<eps>")."""
    head = (row["dataset"], row["defense"])
    if row["attack"] == CLEAN:
        return (*head, "clean")
    if row["attack"] == WORST:
        return (*head, "worst_case", f"{row['norm']}@{number_key(row['eps'])}")
    return (*head, "attacks", f"{row['attack']}@{number_key(row['eps'])}")


def certified_path(row: dict[str, Any]) -> tuple[str, ...]:
    """Keys of one certified-table row: (dataset, defense, "certified", "<radius norm>@<T>")."""
    return row["dataset"], row["defense"], "certified", f"{row['norm'] or 'radius'}@{number_key(row['threshold'])}"


def robust_path(row: dict[str, Any]) -> tuple[str, ...]:
    """Keys of one robust-table row: (dataset, defense, "robust", "<attack>@<L_attack>", "T=<T>")."""
    return (row["dataset"], row["defense"], "robust", f"{row['attack']}@{number_key(row['eps'])}",
            f"T={number_key(row['threshold'])}")


def _overhead(row: dict[str, Any]) -> dict[str, Any]:
    """The measured costs of one overhead-table row; what was not measured is left out."""
    costs: dict[str, Any] = {}
    predict = {c[len("predict_s_"):]: rounded(v) for c, v in row.items() if c.startswith("predict_s_")}
    passes = {c[len("passes "):]: rounded(v) for c, v in row.items() if c.startswith("passes ")}
    for key, column in (("train_steps", "train_steps"), ("train_s_per_step", "train_s_per_step"),
                        ("train_vs_undefended", "train_relative"), ("certify_s_per_image", "certify_s")):
        value = rounded(row.get(column))
        if value is not None:
            costs[key] = int(value) if key == "train_steps" else value
    for key, values in (("predict_s_per_image", predict), ("forward_passes_per_example", passes)):
        kept = {draws: v for draws, v in values.items() if v is not None}
        if kept:
            costs[key] = kept
    return costs


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _records(frame: pd.DataFrame | None) -> list[dict[str, Any]]:
    return [] if frame is None else frame.to_dict("records")


def build_metrics(frames: dict[str, Any]) -> dict[str, Any]:
    """The metrics.json document of a run from `run_frames`' output (its info, cells and table frames)."""
    tree: dict[str, Any] = {}
    for row in _records(frames.get("accuracy")):
        _put(tree, accuracy_path(row), proportion(row["accuracy"], row["ci_low"], row["ci_high"], row["n"]))
    for row in _records(frames.get("certified")):
        _put(tree, certified_path(row), proportion(row["certified_accuracy"], row["certified_accuracy_ci_low"],
                                                   row["certified_accuracy_ci_high"], row["n"]))
    for row in _records(frames.get("robust")):
        # Precision's denominator is the certified predictions, recall's every example.
        _put(tree, (*robust_path(row), "precision"), proportion(row["precision"], row["precision_ci_low"],
                                                               row["precision_ci_high"], row["certified"]))
        _put(tree, (*robust_path(row), "recall"), proportion(row["recall"], row["recall_ci_low"],
                                                            row["recall_ci_high"], row["n"]))
    for row in _records(frames.get("overhead")):
        costs = _overhead(row)
        if costs:
            _put(tree, (row["dataset"], row["defense"], "overhead"), costs)
    info = frames["info"]
    environment = info.get("environment") or {}
    return {"schema_version": SCHEMA_VERSION, "metrics": tree, "run": {
        "id": info["run_id"], "profile": info["profile"], "git_commit": environment.get("git_commit"),
        "package_version": environment.get("package_version"),
        "created": datetime.fromtimestamp(info["created"], tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": frames.get("device") or None,
        "complete": all(records for _, records in frames.get("cells", []))}}


def metrics_text(document: dict[str, Any]) -> str:
    """The file's text: sorted keys, two-space indent, strict JSON, so two runs' files diff line by line."""
    return json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"


def flatten_metrics(document: dict[str, Any]) -> dict[str, Any]:
    """Every number under "metrics" by its path ("mnist5k/undefended/attacks/pgd_l2@0.5/accuracy")."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key in sorted(node):
                walk(node[key], f"{prefix}{SEPARATOR}{key}" if prefix else str(key))
        else:
            flat[prefix] = node

    walk(document.get("metrics", {}), "")
    return flat


def read_metrics(path: str | Path) -> dict[str, Any]:
    """A metrics.json document, given the file or the run folder holding it."""
    path = Path(path)
    file = path / METRICS_NAME if path.is_dir() else path
    fix = "pass a run folder or its metrics.json (`pixeldp-bench report RUN` writes it)"
    try:
        document = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise MetricsError(f"no metrics file at {file}; {fix}") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MetricsError(f"{file} is not a readable metrics.json ({str(exc)[:80]}); {fix}") from exc
    version = document.get("schema_version") if isinstance(document, dict) else None
    if version != SCHEMA_VERSION:
        raise MetricsError(f"{file} has metrics schema {version!r}, this version reads {SCHEMA_VERSION}; "
                           "re-run `pixeldp-bench report RUN` on its run to rewrite it")
    return document


def diff_metrics(old: dict[str, Any], new: dict[str, Any], everything: bool = False) -> pd.DataFrame:
    """Like `dvc metrics diff`: one row (path, old, new, change) per number that differs or is on one side
    only (every number with `everything`), sorted by path; old / new are None where a side lacks the
    number (or it is null), change is new - old (NaN unless both are numbers)."""
    a, b = flatten_metrics(old), flatten_metrics(new)
    rows = []
    for path in sorted(a.keys() | b.keys()):
        before, after = a.get(path), b.get(path)
        if before == after and path in a and path in b and not everything:
            continue
        # Metrics hold numbers and nulls only (no booleans): both numbers have a change.
        change = after - before if isinstance(before, int | float) and isinstance(after, int | float) else np.nan
        rows.append({"path": path, "old": before, "new": after, "change": change})
    # old and new stay objects: an int stays an int and a missing number None, as in the files.
    frame = pd.DataFrame(rows, columns=["path", "old", "new", "change"], dtype=object)
    return frame.astype({"change": float})


def format_diff(frame: pd.DataFrame, old: dict[str, Any], new: dict[str, Any]) -> str:
    """Terminal text of `diff_metrics`: which runs, the rows ('-' where a side lacks the number), a count."""
    runs = f"old {old.get('run', {}).get('id')} vs new {new.get('run', {}).get('id')}\n"
    if frame.empty:
        return runs + "no metric changed\n"
    shown = frame.assign(**{side: ["-" if v is None else f"{v:.6g}" for v in frame[side]] for side in ("old", "new")},
                         change=["-" if not np.isfinite(v) else f"{v:+.6g}" for v in frame["change"]])
    changed = sum(1 for a, b in zip(frame["old"], frame["new"], strict=True) if a != b)
    return runs + to_text_left(shown) + f"\n{changed} metric(s) differ\n"
