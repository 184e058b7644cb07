"""Accuracy-under-attack tables derived from per-example records, with n and 95% Clopper-Pearson CIs."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from bench.stats import clopper_pearson
from bench.types import Cell, Record

CLEAN = "clean"
WORST = "worst case"


def correctness_columns(cell: Cell, records: list[Record], l_attack: dict[str, list[float]]):
    """Yield (attack label, norm, eps, per-example correct flags (n,) bool) for one cell.

    Fixed-size attacks give one column at their eps; minimum-norm attacks give one column per
    L_attack of the grid: correct when the clean prediction is right and the smallest adversarial
    found is larger than L_attack.
    """
    label = np.array([r.label for r in records])
    clean_ok = np.array([r.clean_pred for r in records]) == label
    if cell.attack == "none":
        yield CLEAN, None, None, clean_ok
        return
    if cell.eps is not None:
        yield cell.attack_label, cell.norm, cell.eps, clean_ok & (np.array([r.adv_pred for r in records]) == label)
        return
    norms = np.array([r.norm for r in records])
    for eps in l_attack.get(cell.norm, []):
        yield cell.attack_label, cell.norm, eps, clean_ok & (norms > eps)


def accuracy_frame(cells: list[tuple[Cell, list[Record]]], l_attack: dict[str, list[float]]) -> pd.DataFrame:
    """Long table: one row per (dataset, defense, attack, norm, eps) with n, correct, accuracy, CI.

    The worst case per (dataset, defense, norm, eps) is the per-example AND over every attack,
    i.e. the minimum over attacks example by example, never an average of accuracies.
    """
    rows = []
    worst: "OrderedDict[tuple, dict[int, bool]]" = OrderedDict()
    for cell, records in cells:
        if not records:
            continue
        indices = [r.index for r in records]
        for attack, norm, eps, correct in correctness_columns(cell, records, l_attack):
            rows.append({"dataset": cell.dataset, "defense": cell.defense_label, "attack": attack,
                         "norm": norm or "", "eps": np.nan if eps is None else float(eps),
                         "n": len(correct), "correct": int(correct.sum())})
            if norm is not None:
                slot = worst.setdefault((cell.dataset, cell.defense_label, norm, float(eps)), {})
                for index, ok in zip(indices, correct):
                    slot[index] = slot.get(index, True) and bool(ok)
    attacks_per_slot: dict[tuple, set] = {}
    for row in rows:
        if row["norm"]:
            attacks_per_slot.setdefault((row["dataset"], row["defense"], row["norm"], row["eps"]), set()).add(row["attack"])
    for (dataset, defense, norm, eps), flags in worst.items():
        if len(attacks_per_slot[(dataset, defense, norm, eps)]) < 2:
            continue  # a single attack's worst case is that attack's column
        rows.append({"dataset": dataset, "defense": defense, "attack": WORST, "norm": norm, "eps": eps,
                     "n": len(flags), "correct": int(sum(flags.values()))})
    frame = pd.DataFrame(rows, columns=["dataset", "defense", "attack", "norm", "eps", "n", "correct"])
    frame["accuracy"] = frame["correct"] / frame["n"]
    low, high = clopper_pearson(frame["correct"].to_numpy(), frame["n"].to_numpy())
    frame["ci_low"], frame["ci_high"] = low, high
    return frame


def _column_name(attack: str, norm: str, eps: float) -> str:
    return CLEAN if attack == CLEAN else f"{attack} {norm}={eps:g}"


def accuracy_pivot(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide table: rows dataset/defense, columns attack x eps; cells 'acc% [lo, hi]'; plus n."""
    text = frame.assign(
        column=[_column_name(a, n, e) for a, n, e in zip(frame["attack"], frame["norm"], frame["eps"])],
        cell=[f"{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
              for a, lo, hi in zip(frame["accuracy"], frame["ci_low"], frame["ci_high"])],
    )
    # Column order: clean, then each norm's attacks by eps, then that norm's worst case.
    order = [CLEAN] + [c for _, c in sorted(
        {((n, a == WORST, a, e), _column_name(a, n, e)) for a, n, e in zip(frame["attack"], frame["norm"], frame["eps"])
         if a != CLEAN})]
    pivot = text.pivot_table(index=["dataset", "defense"], columns="column", values="cell", aggfunc="first", sort=False)
    pivot = pivot.reindex(columns=[c for c in dict.fromkeys(order) if c in pivot.columns])
    n = text.groupby(["dataset", "defense"], sort=False)["n"].max()
    pivot.insert(0, "n", n.reindex(pivot.index))
    return pivot.fillna("-").reset_index()


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no external tabulate dependency)."""
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_text(table: pd.DataFrame) -> str:
    """Aligned plain text for the terminal."""
    return table.to_string(index=False) + "\n"


def write_accuracy_tables(frame: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """Save the long CSV and the wide Markdown table; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "accuracy_under_attack.csv", "md": folder / "accuracy_under_attack.md"}
    frame.to_csv(paths["csv"], index=False, float_format="%.6g")
    paths["md"].write_text("Accuracy under attack, % [95% Clopper-Pearson interval]; n examples per row.\n\n"
                           + to_markdown(accuracy_pivot(frame)))
    return paths
