"""Certified-accuracy and robust precision/recall tables of certified defenses (Lecuyer et al. 2019, Sec. IV)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import pandas as pd

from bench.core.defense import certified_norm
from bench.core.registry import DEFENSES
from bench.reporting.tables import WORST, add_proportion, percent_with_ci
from bench.core.types import Cell, Record

DEFAULT_ROBUST_THRESHOLDS = (0.05, 0.1)


def certifier_name(cell: Cell) -> str:
    """The certificate behind a cell's radii: defense_params["certifier"], else the defense's registered
    default (DefenseInfo.certifier), else the defense's name."""
    if cell.defense_params.get("certifier"):
        return str(cell.defense_params["certifier"])
    if cell.defense in DEFENSES:
        return DEFENSES.info(cell.defense).certifier or cell.defense
    return cell.defense


def certificate_norm(cell: Cell) -> str:
    """The norm a cell's radii are measured in ("" when unknown); see bench.core.defense.certified_norm."""
    return certified_norm(cell.defense, cell.defense_params)


def is_certified(records: list[Record]) -> bool:
    """A cell's records come from a certified defense when they carry radii."""
    return any(r.radius is not None for r in records)


def radii(records: list[Record]) -> np.ndarray:
    """(n,) certified radii; NaN (never >= any T) where a record has none."""
    return np.array([np.nan if r.radius is None else r.radius for r in records], dtype=float)


def clean_cells(cells: list[tuple[Cell, list[Record]]]) -> OrderedDict[tuple[str, str], tuple[Cell, list[Record]]]:
    """(dataset, defense label) -> its clean cell and records (finished cells only)."""
    return OrderedDict(((c.dataset, c.defense_label), (c, r)) for c, r in cells if c.attack == "none" and r)


def certified_flags(cells: list[tuple[Cell, list[Record]]],
                    thresholds: list[float]) -> OrderedDict[tuple, dict[int, bool]]:
    """(dataset, defense, certifier, radius norm, T) -> {index: correct AND radius >= T} per certified clean cell."""
    out: OrderedDict[tuple, dict[int, bool]] = OrderedDict()
    for (dataset, defense), (cell, records) in clean_cells(cells).items():
        if not is_certified(records):
            continue
        # A clean cell with `certify_examples` certifies a subset: only those rows are its sample.
        records = [r for r in records if r.radius is not None]
        correct = np.array([r.clean_pred == r.label for r in records])
        radius = radii(records)
        for t in thresholds:
            ok = correct & (radius >= t)
            out[(dataset, defense, certifier_name(cell), certificate_norm(cell), float(t))] = {
                r.index: bool(v) for r, v in zip(records, ok, strict=True)}
    return out


def certified_frame(cells: list[tuple[Cell, list[Record]]], thresholds: list[float]) -> pd.DataFrame:
    """Long table: one row per (dataset, certified defense, threshold T) with n, certified count and CI.

    Certified accuracy at T = fraction of test examples predicted correctly with radius >= T
    (Lecuyer et al. 2019, Sec. IV-A); at T = 0 it is the clean accuracy of the certified predictor.
    """
    rows = [{"dataset": d, "defense": defense, "certifier": certifier, "norm": norm, "threshold": t,
             "n": len(flags), "certified": int(sum(flags.values()))}
            for (d, defense, certifier, norm, t), flags in certified_flags(cells, thresholds).items()]
    frame = pd.DataFrame(rows, columns=["dataset", "defense", "certifier", "norm", "threshold", "n", "certified"])
    return add_proportion(frame, "certified", "n", "certified_accuracy")


def certified_pivot(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide table: rows dataset/defense/certifier/norm, n, one column 'T=...' per threshold with 'acc% [lo, hi]'."""
    index = ["dataset", "defense", "certifier", "norm"]
    if frame.empty:
        return pd.DataFrame(columns=index + ["n"])
    text = frame.assign(column=[f"T={t:g}" for t in frame["threshold"]],
                        cell=[percent_with_ci(a, lo, hi) for a, lo, hi in zip(
                            frame["certified_accuracy"], frame["certified_accuracy_ci_low"],
                            frame["certified_accuracy_ci_high"], strict=True)])
    pivot = text.pivot_table(index=index, columns="column", values="cell", aggfunc="first", sort=False)
    pivot = pivot.reindex(columns=list(dict.fromkeys(text["column"])))
    pivot.insert(0, "n", text.groupby(index, sort=False)["n"].max().reindex(pivot.index))
    return pivot.fillna("-").reset_index()


def judged_under_attack(cell: Cell, records: list[Record], clean: list[Record] | None,
                        l_attack: dict[str, list[float]]) -> Iterator[tuple[float, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (L_attack, indices (n,), correct (n,) bool, radius (n,)) of the prediction judged under attack.

    Correct follows the accuracy table: the clean prediction is right and the attacked one too.
    A fixed-size attack is judged at its eps with the radius of the adversarial prediction. For a
    minimum-norm attack at L_attack, an adversarial example of norm <= L_attack is the judged
    input (wrong, with its radius); otherwise the attacker found nothing within L_attack and the
    clean prediction stands, with the radius the clean cell certified for that example (NaN when
    the clean cell is missing).
    """
    indices = np.array([r.index for r in records])
    label = np.array([r.label for r in records])
    clean_ok = np.array([r.clean_pred for r in records]) == label
    radius = radii(records)
    if cell.eps is not None:
        yield float(cell.eps), indices, clean_ok & (np.array([r.adv_pred for r in records]) == label), radius
        return
    by_index = {} if clean is None else {r.index: r.radius for r in clean}
    clean_radius = np.array([np.nan if by_index.get(i) is None else by_index[i] for i in indices], dtype=float)
    norms = np.array([r.norm for r in records])
    grid = l_attack.get(cell.norm, []) if cell.norm is not None else []  # no norm: no L_attack grid
    for eps in grid:
        found = norms <= eps
        yield float(eps), indices, clean_ok & ~found, np.where(found, radius, clean_radius)


def robust_flags(cells: list[tuple[Cell, list[Record]]], l_attack: dict[str, list[float]],
                 thresholds=DEFAULT_ROBUST_THRESHOLDS) -> OrderedDict[tuple, tuple[dict[int, bool], dict[int, bool]]]:
    """(dataset, defense, certifier, attack, norm, L_attack, T) ->
    ({index: radius >= T}, {index: correct and radius >= T})."""
    cleans = clean_cells(cells)
    out: OrderedDict[tuple, tuple[dict[int, bool], dict[int, bool]]] = OrderedDict()
    for cell, records in cells:
        if cell.attack == "none" or not records or not is_certified(records):
            continue
        if certificate_norm(cell) not in ("", cell.norm):
            continue  # radii in another norm than the attack's say nothing about its perturbations
        clean = cleans.get((cell.dataset, cell.defense_label), (None, None))[1]
        for eps, indices, correct, radius in judged_under_attack(cell, records, clean, l_attack):
            for t in thresholds:
                confident = radius >= t
                key = (cell.dataset, cell.defense_label, certifier_name(cell), cell.attack_label, cell.norm, eps,
                       float(t))
                out[key] = (dict(zip(indices.tolist(), confident.tolist(), strict=True)),
                            dict(zip(indices.tolist(), (correct & confident).tolist(), strict=True)))
    return out


def robust_frame(cells: list[tuple[Cell, list[Record]]], l_attack: dict[str, list[float]],
                 thresholds=DEFAULT_ROBUST_THRESHOLDS) -> pd.DataFrame:
    """Long table of robust precision and recall per (dataset, defense, attack, L_attack, T).

    Precision at T = accuracy among the adversarial predictions whose radius is >= T; recall at
    T = fraction of all test points with such a correct prediction (Lecuyer et al. 2019, Sec. IV-C).
    """
    rows = [{"dataset": d, "defense": defense, "certifier": certifier, "attack": attack, "norm": norm, "eps": eps,
             "threshold": t, "n": len(confident), "certified": int(sum(confident.values())),
             "robust_correct": int(sum(correct.values()))}
            for (d, defense, certifier, attack, norm, eps, t), (confident, correct)
            in robust_flags(cells, l_attack, thresholds).items()]
    frame = pd.DataFrame(rows, columns=["dataset", "defense", "certifier", "attack", "norm", "eps", "threshold", "n",
                                        "certified", "robust_correct"])
    frame = add_proportion(frame, "robust_correct", "certified", "precision")
    return add_proportion(frame, "robust_correct", "n", "recall")


def reference_accuracy(accuracy: pd.DataFrame, dataset: str, defense: str, attack: str, norm: str,
                       eps: float) -> pd.Series | None:
    """The accuracy-table row of `defense` under the same attack at (norm, eps); else its worst case there."""
    rows = accuracy[(accuracy["dataset"] == dataset) & (accuracy["defense"] == defense) & (accuracy["norm"] == norm)
                    & np.isclose(accuracy["eps"].astype(float), eps)]
    for choice in (rows[rows["attack"] == attack], rows[rows["attack"] == WORST], rows):
        if len(choice) == 1:
            return choice.iloc[0]
    return None


def robust_pivot(frame: pd.DataFrame, accuracy: pd.DataFrame, certified_defenses: set[tuple[str, str]]) -> pd.DataFrame:
    """Wide table: one row per (dataset, defense, attack, L_attack); 'P@T' and 'R@T' columns per T,
    then 'acc <defense>' for every non-certified defense of the dataset under the same attack (or its
    worst case at that L_attack) on the same test examples."""
    index = ["dataset", "defense", "certifier", "attack", "norm", "eps"]
    if frame.empty:
        return pd.DataFrame(columns=index + ["n"])
    out = []
    for keys, group in frame.groupby(index, sort=False):
        row = dict(zip(index, keys, strict=True))
        row["eps"] = f"{row['eps']:g}"
        row["n"] = int(group["n"].max())
        for t in group.itertuples(index=False):
            row[f"P@{t.threshold:g}"] = percent_with_ci(t.precision, t.precision_ci_low, t.precision_ci_high)
            row[f"R@{t.threshold:g}"] = percent_with_ci(t.recall, t.recall_ci_low, t.recall_ci_high)
        references = accuracy[(accuracy["dataset"] == keys[0]) & (accuracy["attack"] != "clean")]
        for other in dict.fromkeys(references["defense"]):
            if (keys[0], other) in certified_defenses:
                continue
            ref = reference_accuracy(accuracy, keys[0], other, keys[3], keys[4], keys[5])
            row[f"acc {other}"] = ("-" if ref is None
                                   else percent_with_ci(ref["accuracy"], ref["ci_low"], ref["ci_high"]))
        out.append(row)
    return pd.DataFrame(out).fillna("-")


CERTIFIED_CAPTION = ("Certified accuracy, % [95% Clopper-Pearson interval]: correct with certified radius >= T; "
                     "n examples per row.")
ROBUST_CAPTION = ("Robust precision (P@T: accuracy among adversarial predictions with radius >= T) and recall "
                  "(R@T: fraction of points with such a correct prediction) under attack of size eps = L_attack, "
                  "% [95% Clopper-Pearson interval], next to the accuracy of non-certified defenses on the same "
                  "examples.")
