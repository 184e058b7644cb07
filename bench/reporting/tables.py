"""Accuracy-under-attack tables derived from per-example records, and the table writers (CSV, Markdown, LaTeX)."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from bench.core.atomic import write_text
from bench.core.stats import clopper_pearson
from bench.core.types import Cell, Record

CLEAN = "clean"
WORST = "worst case"
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


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
    grid = l_attack.get(cell.norm, []) if cell.norm is not None else []  # no norm: no L_attack grid
    for eps in grid:
        yield cell.attack_label, cell.norm, eps, clean_ok & (norms > eps)


def accuracy_flags(cells: list[tuple[Cell, list[Record]]],
                   l_attack: dict[str, list[float]]) -> OrderedDict[tuple, dict[int, bool]]:
    """Per-example correctness of every accuracy-table row: (dataset, defense, attack, norm, eps) -> {index: ok}.

    `norm` is "" and `eps` NaN for the clean row. The worst case per (dataset, defense, norm,
    eps) is the per-example AND over every attack, i.e. the minimum over attacks example by
    example, never an average of accuracies. It is added at every budget any attack reached, even
    where only one did: a worst-case column that skipped those budgets left gaps in the tables and
    let Fig. 3's worst-case line pass above measured points.
    """
    rows: OrderedDict[tuple, dict[int, bool]] = OrderedDict()
    worst: OrderedDict[tuple, dict[int, bool]] = OrderedDict()
    for cell, records in cells:
        if not records:
            continue
        indices = [r.index for r in records]
        for attack, norm, eps, correct in correctness_columns(cell, records, l_attack):
            key = (cell.dataset, cell.defense_label, attack, norm or "", np.nan if eps is None else float(eps))
            rows[key] = dict(zip(indices, (bool(ok) for ok in correct), strict=True))
            if norm is not None:
                slot = (cell.dataset, cell.defense_label, norm, float(eps))
                flags = worst.setdefault(slot, {})
                for index, ok in zip(indices, correct, strict=True):
                    flags[index] = flags.get(index, True) and bool(ok)
    for (dataset, defense, norm, eps), flags in worst.items():
        rows[(dataset, defense, WORST, norm, eps)] = flags
    return rows


def add_proportion(frame: pd.DataFrame, successes: str, trials: str, name: str) -> pd.DataFrame:
    """Add column `name` = successes / trials (NaN when trials is 0) and its 95% Clopper-Pearson interval."""
    k, n = frame[successes].to_numpy(dtype=float), frame[trials].to_numpy(dtype=float)
    low, high = clopper_pearson(k, n)
    empty = n == 0
    frame[name] = np.where(empty, np.nan, k / np.where(empty, 1.0, n))
    frame[name + "_ci_low"] = np.where(empty, np.nan, low)
    frame[name + "_ci_high"] = np.where(empty, np.nan, high)
    return frame


def accuracy_frame(cells: list[tuple[Cell, list[Record]]], l_attack: dict[str, list[float]]) -> pd.DataFrame:
    """Long table: one row per (dataset, defense, attack, norm, eps) with n, correct, accuracy, CI.

    The worst case per (dataset, defense, norm, eps) is the per-example AND over every attack,
    i.e. the minimum over attacks example by example, never an average of accuracies.
    """
    rows = [{"dataset": dataset, "defense": defense, "attack": attack, "norm": norm, "eps": eps,
             "n": len(flags), "correct": int(sum(flags.values()))}
            for (dataset, defense, attack, norm, eps), flags in accuracy_flags(cells, l_attack).items()]
    frame = pd.DataFrame(rows, columns=["dataset", "defense", "attack", "norm", "eps", "n", "correct"])
    frame["accuracy"] = frame["correct"] / frame["n"]
    low, high = clopper_pearson(frame["correct"].to_numpy(), frame["n"].to_numpy())
    frame["ci_low"], frame["ci_high"] = low, high
    return frame


def percent_with_ci(value: float, low: float, high: float) -> str:
    """'97.5 [94.3, 99.2]' (percent, one decimal), or '-' when undefined (an empty denominator)."""
    if value is None or not np.isfinite(value):
        return "-"
    return f"{100 * value:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _column_name(attack: str, norm: str, eps: float) -> str:
    return CLEAN if attack == CLEAN else f"{attack} {norm}={eps:g}"


def accuracy_pivot(frame: pd.DataFrame) -> pd.DataFrame:
    """Wide table: rows dataset/defense, columns attack x eps; cells 'acc% [lo, hi]'; plus n."""
    text = frame.assign(
        column=[_column_name(a, n, e) for a, n, e in zip(frame["attack"], frame["norm"], frame["eps"], strict=True)],
        cell=[percent_with_ci(a, lo, hi)
              for a, lo, hi in zip(frame["accuracy"], frame["ci_low"], frame["ci_high"], strict=True)],
    )
    # Column order: clean, then each norm's attacks by eps, then that norm's worst case.
    order = [CLEAN] + [c for _, c in sorted(
        {((n, a == WORST, a, e), _column_name(a, n, e))
         for a, n, e in zip(frame["attack"], frame["norm"], frame["eps"], strict=True) if a != CLEAN})]
    pivot = text.pivot_table(index=["dataset", "defense"], columns="column", values="cell", aggfunc="first", sort=False)
    pivot = pivot.reindex(columns=[c for c in dict.fromkeys(order) if c in pivot.columns])
    grouped = text.groupby(["dataset", "defense"], sort=False)["n"]
    # Columns on nested subsets of different sizes (clean on all, attacks on fewer) show the range.
    n = pd.Series([hi if lo == hi else f"{lo}-{hi}" for lo, hi in zip(grouped.min(), grouped.max(), strict=True)],
                  index=grouped.max().index, dtype=object)
    pivot.insert(0, "n", n.reindex(pivot.index))
    return pivot.fillna("-").reset_index()


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no external tabulate dependency)."""
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


TEXT_WIDTH = 120  # characters per line of the terminal summary (a laptop terminal; files keep every column)
KEY_COLUMNS = ("dataset", "defense", "certifier", "attack", "norm", "eps", "n")


def to_text(table: pd.DataFrame, width: int = TEXT_WIDTH) -> str:
    """Aligned plain text for the terminal, wrapped into blocks of at most `width` characters a line.

    A wide table (the smoke profile's accuracy table is 800 characters) is cut into column blocks;
    each block repeats the leading key columns (dataset, defense, n, ...) so every line reads alone.
    """
    full = table.to_string(index=False)
    # No rows: pandas lists the column names ("Empty DataFrame"), there are no aligned columns to cut.
    if max(map(len, full.splitlines()), default=0) <= width or table.empty:
        return full + "\n"
    keys: list[str] = []
    for column in table.columns:
        if column not in KEY_COLUMNS:
            break
        keys.append(column)
    values = [c for c in table.columns if c not in keys]

    def line_width(columns: list[str]) -> int:
        return max(map(len, table[columns].to_string(index=False).splitlines()), default=0)

    # pandas pads each column to its own width and joins them with one space, so a block's width is its
    # columns' widths plus separators: each column is measured once (re-rendering every growing block was
    # quadratic). -1: a block without key columns has no separator before its first column.
    start = line_width(keys) if keys else -1
    blocks: list[list[str]] = []
    used = 0
    for column in values:
        need = 1 + line_width([column])
        if blocks and used + need <= width:
            blocks[-1].append(column)
            used += need
        else:
            blocks.append([column])
            used = start + need
    return "\n".join(table[keys + block].to_string(index=False) + "\n" for block in blocks)


def to_text_left(frame: pd.DataFrame) -> str:
    """A frame of strings as left-aligned text columns (a metric's path reads from its start)."""
    widths = {c: max(len(c), *(len(str(v)) for v in frame[c])) for c in frame.columns}
    lines = [" ".join(f"{c:<{widths[c]}}" for c in frame.columns)]
    lines += [" ".join(f"{str(v):<{widths[c]}}" for c, v in zip(frame.columns, row, strict=True))
              for row in frame.itertuples(index=False)]
    return "\n".join(line.rstrip() for line in lines)


def latex_escape(text: object) -> str:
    """Escape LaTeX's special characters in a cell or header."""
    return "".join(LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _is_number(value: object) -> bool:
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs `table` environment: text columns left-aligned, purely numeric columns right-aligned."""
    align = "".join("r" if len(table) and all(_is_number(v) for v in table[c]) else "l" for c in table.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
             rf"\label{{tab:{label}}}", r"\small", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def csv_text(long: pd.DataFrame) -> str:
    """A long table as its `<stem>.csv` holds it (six significant digits; the HTML report shows the same text)."""
    return long.to_csv(index=False, float_format="%.6g")


def write_table(long: pd.DataFrame, wide: pd.DataFrame, folder: Path, stem: str, caption: str) -> dict[str, Path]:
    """Save one table as `<stem>.csv` (long, machine-readable), `.md` and `.tex` (wide); returns the paths."""
    paths = {"csv": folder / f"{stem}.csv", "md": folder / f"{stem}.md", "tex": folder / f"{stem}.tex"}
    write_text(paths["csv"], csv_text(long))
    write_text(paths["md"], caption + "\n\n" + to_markdown(wide))
    write_text(paths["tex"], to_latex(wide, caption, stem.replace("_", "-")))
    return paths


ACCURACY_CAPTION = "Accuracy under attack, % [95% Clopper-Pearson interval]; n examples per row."


def write_accuracy_tables(frame: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """Save the long CSV and the wide Markdown and LaTeX tables; returns the paths written."""
    return write_table(frame, accuracy_pivot(frame), folder, "accuracy_under_attack", ACCURACY_CAPTION)
