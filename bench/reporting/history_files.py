"""The files of a history (bench.reporting.history): its plot (PNG, PDF), text and CSV; and the history part of a
run's report, written when the store holds earlier runs of its profile."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.core.atomic import write_text
from bench.core.errors import UserError
from bench.execution.store import Store
from bench.reporting.history import format_history, run_history, select_runs
from bench.reporting.plots import PALETTE, new_figure, publication_style, save_figure

__all__ = ["REPORT_RUNS", "plot_history", "report_history", "write_history"]

REPORT_RUNS = 10  # a run's report shows its profile's last 10 runs: each costs its tables again


def _label(run: pd.Series) -> str:
    commit = str(run["git_commit"] or "-").partition("+")
    return f"{commit[0][:7]}{'+' if commit[1] else ''}\n{run['package_version'] or '-'}"


def plot_history(frame: pd.DataFrame) -> Figure | None:
    """Each metric against its runs (oldest left, labelled commit / version), accuracies in % with their 95%
    intervals, other numbers on a panel of their own; REGRESSION points crossed in red. None when empty."""
    if frame.empty:
        return None
    runs = frame.drop_duplicates("run_id").reset_index(drop=True)
    position = {run_id: i for i, run_id in enumerate(runs["run_id"])}
    kinds = [k for k in (True, False) if (frame.groupby("metric")["n"].apply(lambda n: n.notna().any()) == k).any()]
    with publication_style():
        # The legend sits right of the axes (metric paths are long): the figure is widened for it.
        figure, axes = new_figure(len(kinds), 1, width=max(9.0, 4.0 + 1.0 * len(runs)))
        for ax, proportion in zip(axes[:, 0], kinds, strict=True):
            scale = 100.0 if proportion else 1.0
            drops = []
            for i, (metric, line) in enumerate(frame.groupby("metric", sort=False)):
                if line["n"].notna().any() != proportion:
                    continue
                x = line["run_id"].map(position).to_numpy()
                color = PALETTE[i % len(PALETTE)]
                ax.plot(x, scale * line["value"], marker="o", markersize=4, color=color, label=metric)
                if proportion:
                    ax.fill_between(x, scale * line["low"], scale * line["high"], color=color, alpha=0.12,
                                    linewidth=0)
                drops.append(line[line["status"] == "REGRESSION"])
            drop = pd.concat(drops)
            if len(drop):
                ax.plot(drop["run_id"].map(position), scale * drop["value"], linestyle="none", marker="X",
                        markersize=11, color="red", label="REGRESSION")
            ax.set_xticks(np.arange(len(runs)), [_label(run) for _, run in runs.iterrows()], fontsize="small")
            ax.set_xlabel("run (git commit, package version), oldest first")
            ax.set_ylabel("accuracy (%)" if proportion else "value")
            if proportion:
                ax.set_ylim(-2, 102)
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        axes[0, 0].set_title(f"history of profile {frame['profile'].iloc[0]}")
    return figure


def write_history(frame: pd.DataFrame, folder: Path, stem: str) -> dict[str, Path]:
    """`<stem>.txt` (format_history), `<stem>.csv` (the frame) and `<stem>.png` / `.pdf` (the plot) under folder."""
    paths = {"txt": write_text(folder / f"{stem}.txt", format_history(frame)),
             "csv": write_text(folder / f"{stem}.csv", frame.to_csv(index=False, float_format="%.6g"))}
    figure = plot_history(frame)
    if figure is not None:
        paths |= save_figure(figure, folder, stem)
    return paths


def report_history(store: Store, run_id: str, folder: Path,
                   prepare: Callable[[Store, str], None] | None = None) -> str | None:
    """Write `history.*` into a run's folder when its profile has earlier runs in the store (the last
    REPORT_RUNS up to this one); returns the line to print, None when this is the profile's only run.

    A history that cannot be built (an earlier run damaged, its plugin gone) is one line saying so:
    it never fails the run that was just computed.
    """
    profile = store.run_info(run_id)["profile"]
    try:
        _, runs = select_runs(store, profile, upto=run_id, last=REPORT_RUNS)
        if len(runs) < 2:
            return None
        frame = run_history(store, profile=profile, upto=run_id, last=REPORT_RUNS, prepare=prepare)
    except UserError as exc:
        return f"history of profile {profile} not written: {exc}"
    paths = write_history(frame, folder, "history")
    regressions = int((frame["status"] == "REGRESSION").sum())
    return (f"history of the last {len(runs)} runs of profile {profile}: {regressions} regression(s) in its "
            f"worst-case accuracies; {paths['txt']}")
