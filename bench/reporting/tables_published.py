"""Published vs measured: a zoo checkpoint's clean error and certified robust error next to its paper's numbers."""
from __future__ import annotations

import numpy as np
import pandas as pd

from bench.reporting.tables_certified import certificate_norm, clean_cells, is_certified, radii
from bench.core.types import Cell, Record
from bench.core.zoo import by_sha256

PUBLISHED_CAPTION = ("Published vs measured: error and certified robust error bound (%) of zoo checkpoints (bench.zoo) "
                     "at the published radius, the paper's number, ours, and ours minus the paper's. The bound counts "
                     "an example as an error unless it is predicted correctly with a certified radius >= eps.")
COLUMNS = ["dataset", "defense", "model", "norm", "eps", "input_set", "input_set_published", "n", "n_certified",
           "clean_error_published", "clean_error", "robust_error_published", "robust_error"]


def _row(cell: Cell, records: list[Record]) -> dict | None:
    """One row for a clean cell whose weights are a zoo checkpoint (None for any other cell)."""
    entry = by_sha256(cell.defense_params.get("weights_sha256"))
    if entry is None:
        return None
    published = entry.published
    correct = np.array([r.clean_pred == r.label for r in records])
    row = {"dataset": cell.dataset, "defense": cell.defense_label, "model": entry.name, "norm": published.norm,
           "eps": published.eps, "n": len(records), "clean_error": _percent(~correct),
           "clean_error_published": published.clean_error, "robust_error_published": published.robust_error,
           "input_set": "", "input_set_published": _input_set(published.input_box), "n_certified": 0,
           "robust_error": np.nan}
    if is_certified(records) and certificate_norm(cell) == published.norm:
        # A clean cell with `certify_examples` certifies a subset: only those rows carry radii.
        kept = np.array([r.radius is not None for r in records])
        # Radii are float32 (certified at float32(eps)): compare in float32, so 0.1 certified is >= 0.1.
        robust = correct[kept] & (radii(records)[kept].astype(np.float32) >= np.float32(published.eps))
        row |= {"n_certified": int(kept.sum()), "robust_error": _percent(~robust),
                "input_set": _input_set(bool(cell.defense_params.get("input_box", True)))}
    return row


def _percent(errors: np.ndarray) -> float:
    """100 * count / n from the counts, so 582 errors in 10,000 give exactly the float 5.82."""
    return 100 * int(errors.sum()) / len(errors)


def _input_set(box: bool) -> str:
    return "ball in [0,1]" if box else "plain ball"


def published_frame(cells: list[tuple[Cell, list[Record]]]) -> pd.DataFrame:
    """Long table: one row per clean cell of a zoo checkpoint, errors in % (NaN where not measured or published)."""
    rows = [row for cell, records in clean_cells(cells).values() if (row := _row(cell, records)) is not None]
    return pd.DataFrame(rows, columns=COLUMNS)


def _side_by_side(published: float | None, measured: float) -> tuple[str, str, str]:
    """(published, measured, measured - published) as text with two decimals ("-" where missing)."""
    if measured != measured:  # NaN: not certified in the published norm
        return ("-" if published is None else f"{published:.2f}"), "-", "-"
    if published is None or published != published:
        return "-", f"{measured:.2f}", "-"
    return f"{published:.2f}", f"{measured:.2f}", f"{round(measured - published, 2) + 0.0:+.2f}"  # never -0.00


def published_pivot(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide table: per zoo checkpoint, published / measured / difference of the error and the robust error bound."""
    out = []
    for row in frame.itertuples(index=False):
        clean = _side_by_side(row.clean_error_published, row.clean_error)
        robust = _side_by_side(row.robust_error_published, row.robust_error)
        ball = f"{row.norm} {row.eps:g} {row.input_set}".strip()
        if row.input_set and row.input_set != row.input_set_published:  # e.g. the box certifies more than published
            ball += f" (published: {row.input_set_published})"
        n = str(row.n) if row.n_certified in (0, row.n) else f"{row.n} ({row.n_certified} certified)"
        out.append({"dataset": row.dataset, "defense": row.defense, "model": row.model, "ball": ball, "n": n,
                    "error published": clean[0], "error measured": clean[1], "error diff": clean[2],
                    "robust published": robust[0], "robust measured": robust[1], "robust diff": robust[2]})
    return pd.DataFrame(out)
