"""The paper's figures (Lecuyer et al. 2019, Figs. 2-5) drawn from the table frames, as PNG and PDF."""
from __future__ import annotations

import io
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from cycler import cycler
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.core.atomic import write_bytes
from bench.core.registry import DEFENSES, Registry
from bench.reporting.tables import CLEAN, WORST
from bench.reporting.tables_certified import reference_accuracy

BAND_MAX_N = 1000  # draw 95% Clopper-Pearson bands when a point rests on at most this many examples
NORM_TEXT = {"l1": "L1", "l2": "L2", "linf": "L-inf"}
BASELINE_FAMILY = "undefended"  # a figure comparing defenses needs at least one other family
PALETTE = sns.color_palette("colorblind")
STYLE = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper", font_scale=1.3),
         "font.family": "sans-serif", "legend.frameon": False, "pdf.fonttype": 42,
         "axes.prop_cycle": cycler(color=PALETTE)}


@contextmanager
def publication_style() -> Iterator[None]:
    """Readable fonts, white grid and the colour-blind palette, without touching global settings."""
    with rc_context(STYLE):
        yield


def new_figure(rows: int, cols: int, width: float = 6.0, height: float = 3.4) -> tuple[Figure, np.ndarray]:
    """A Figure on the Agg canvas (no pyplot state) and its (rows, cols) array of axes."""
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def family(registry_name: str) -> str:
    """The defense's registered family (DefenseInfo.family: PixelDP, Madry, convex, ...); a defense
    registered without one, or not registered in this process (a plugin not loaded), is its own family."""
    return (DEFENSES.info(registry_name).family or registry_name) if registry_name in DEFENSES else registry_name


def _line(ax, x, y, low, high, n, label: str, color, band_max_n: int, **style) -> None:
    """A percent curve with markers, plus its 95% band where the sample is small."""
    x, y = np.asarray(x, dtype=float), 100 * np.asarray(y, dtype=float)
    ax.plot(x, y, marker="o", markersize=4, label=label, color=color, **style)
    if len(x) and np.max(n) <= band_max_n:
        ax.fill_between(x, 100 * np.asarray(low, dtype=float), 100 * np.asarray(high, dtype=float), color=color,
                        alpha=0.15, linewidth=0)


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(-2, 102)
    if ax.get_legend_handles_labels()[0]:
        # Outside the axes, so that no curve or band is hidden behind it.
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))


def attack_axis_label(norm: str) -> str:
    """x-axis label of an attack-size axis, with its unit (pixels scaled to a range of 1)."""
    return f"L_attack ({NORM_TEXT.get(norm, norm)} norm, pixel range 1)"


def plot_certified(certified: pd.DataFrame, band_max_n: int = BAND_MAX_N) -> Figure | None:
    """Fig. 2: certified accuracy vs threshold T, one line per certified defense (e.g. several L)."""
    if certified.empty:
        return None
    panels = list(dict.fromkeys(zip(certified["dataset"], certified["norm"], strict=True)))
    with publication_style():
        figure, axes = new_figure(1, len(panels))
        for ax, (dataset, norm) in zip(axes[0], panels, strict=True):
            part = certified[(certified["dataset"] == dataset) & (certified["norm"] == norm)]
            for i, ((defense, certifier), line) in enumerate(part.groupby(["defense", "certifier"], sort=False)):
                line = line.sort_values("threshold")
                _line(ax, line["threshold"], line["certified_accuracy"], line["certified_accuracy_ci_low"],
                      line["certified_accuracy_ci_high"], line["n"], f"{defense} ({certifier})",
                      PALETTE[i % len(PALETTE)], band_max_n)
            radius = f"{NORM_TEXT.get(norm, norm)} radius" if norm else "radius"
            _finish(ax, f"threshold T (certified {radius}, pixel range 1)", "certified accuracy (%)", dataset)
    return figure


def _curve(accuracy: pd.DataFrame, dataset: str, defense: str, attack: str, norm: str) -> pd.DataFrame:
    """Accuracy vs L_attack of one attack (or the worst case), starting at L_attack = 0 with clean accuracy."""
    rows = accuracy[(accuracy["dataset"] == dataset) & (accuracy["defense"] == defense)
                    & (accuracy["attack"] == attack) & (accuracy["norm"] == norm)].sort_values("eps")
    clean = accuracy[(accuracy["dataset"] == dataset) & (accuracy["defense"] == defense)
                     & (accuracy["attack"] == CLEAN)]
    if len(rows) and not np.isclose(rows["eps"].min(), 0.0) and len(clean):
        rows = pd.concat([clean.assign(eps=0.0, norm=norm), rows])
    return rows


def worst_curve(accuracy: pd.DataFrame, dataset: str, defense: str, norm: str) -> pd.DataFrame:
    """Per L_attack, the per-example worst case over attacks (bench.reporting.tables adds it at every budget)."""
    return _curve(accuracy, dataset, defense, WORST, norm)


def plot_accuracy_vs_attack(accuracy: pd.DataFrame, band_max_n: int = BAND_MAX_N) -> Figure | None:
    """Fig. 3: accuracy under attack vs L_attack; a panel per defense and norm, a line per attack."""
    attacked = accuracy[accuracy["norm"] != ""]
    if attacked.empty:
        return None
    panels = list(dict.fromkeys(zip(attacked["dataset"], attacked["defense"], strict=True)))
    norms = [n for n in NORM_TEXT if n in set(attacked["norm"])]
    with publication_style():
        figure, axes = new_figure(len(panels), len(norms))
        for r, (dataset, defense) in enumerate(panels):
            for c, norm in enumerate(norms):
                ax = axes[r, c]
                part = attacked[(attacked["dataset"] == dataset) & (attacked["defense"] == defense)
                                & (attacked["norm"] == norm)]
                for i, attack in enumerate(dict.fromkeys(part["attack"])):
                    line = _curve(accuracy, dataset, defense, attack, norm)
                    style = ({"linestyle": "--", "color": "black"} if attack == WORST
                             else {"color": PALETTE[i % len(PALETTE)]})
                    color = style.pop("color")
                    _line(ax, line["eps"], line["accuracy"], line["ci_low"], line["ci_high"], line["n"], attack,
                          color, band_max_n, **style)
                _finish(ax, attack_axis_label(norm), "accuracy under attack (%)", f"{dataset}: {defense}")
    return figure


def plot_defense_comparison(accuracy: pd.DataFrame, registry_names: dict[tuple[str, str], str],
                            band_max_n: int = BAND_MAX_N) -> Figure | None:
    """Fig. 4: every defense of the run (PixelDP, Madry, convex, undefended, ...) under L2 and L-inf attacks,
    worst case per defense, labelled by family; None when the run holds no family besides the baseline.

    Args:
        accuracy: the accuracy frame (bench.reporting.tables.accuracy_frame).
        registry_names: (dataset, defense label) -> registry name, to recognise each defense's family.
    """
    attacked = accuracy[accuracy["norm"] != ""]
    chosen = list(dict.fromkeys(zip(attacked["dataset"], attacked["defense"], strict=True)))
    if not {family(registry_names.get(k, k[1])) for k in chosen} - {BASELINE_FAMILY}:
        return None  # only undefended models: nothing to compare
    datasets = list(dict.fromkeys(d for d, _ in chosen))
    norms = [n for n in NORM_TEXT if n in set(attacked["norm"])]
    with publication_style():
        figure, axes = new_figure(len(datasets), len(norms))
        for r, dataset in enumerate(datasets):
            for c, norm in enumerate(norms):
                ax = axes[r, c]
                for i, (d, defense) in enumerate(k for k in chosen if k[0] == dataset):
                    line = worst_curve(accuracy, d, defense, norm)
                    if line.empty:
                        continue
                    name = family(registry_names.get((d, defense), defense))
                    label = defense if defense.lower().startswith(name.lower()) else f"{name}: {defense}"
                    _line(ax, line["eps"], line["accuracy"], line["ci_low"], line["ci_high"], line["n"], label,
                          PALETTE[i % len(PALETTE)], band_max_n)
                _finish(ax, attack_axis_label(norm), "worst-case accuracy (%)",
                        f"{dataset}: {NORM_TEXT[norm]} attacks")
    return figure


def plot_robust(robust: pd.DataFrame, accuracy: pd.DataFrame, certified_defenses: set[tuple[str, str]],
                band_max_n: int = BAND_MAX_N) -> Figure | None:
    """Fig. 5: robust precision and recall at each T vs L_attack, with non-certified defenses' accuracy."""
    if robust.empty:
        return None
    rows = list(dict.fromkeys(zip(robust["dataset"], robust["defense"], strict=True)))
    attacks = list(dict.fromkeys(robust["attack"]))
    with publication_style():
        figure, axes = new_figure(len(rows), len(attacks))
        for (r, (dataset, defense)), (c, attack) in product(enumerate(rows), enumerate(attacks)):
            ax = axes[r, c]
            part = robust[(robust["dataset"] == dataset) & (robust["defense"] == defense)
                          & (robust["attack"] == attack)]
            if part.empty:
                ax.set_visible(False)  # this attack was not run against this defense
                continue
            norm = part["norm"].iloc[0]
            for i, (t, line) in enumerate(part.groupby("threshold", sort=True)):
                line = line.sort_values("eps")
                color = PALETTE[i % len(PALETTE)]
                _line(ax, line["eps"], line["precision"], line["precision_ci_low"], line["precision_ci_high"],
                      line["certified"], f"precision, T={t:g}", color, band_max_n)
                _line(ax, line["eps"], line["recall"], line["recall_ci_low"], line["recall_ci_high"], line["n"],
                      f"recall, T={t:g}", color, band_max_n, linestyle="--")
            eps_grid = sorted(set(part["eps"]))
            others = [o for o in dict.fromkeys(accuracy.loc[accuracy["dataset"] == dataset, "defense"])
                      if (dataset, o) not in certified_defenses]
            for j, other in enumerate(others):
                refs = [(e, ref) for e in eps_grid
                        if (ref := reference_accuracy(accuracy, dataset, other, attack, norm, e)) is not None]
                if refs:
                    ax.plot([e for e, _ in refs], [100 * ref["accuracy"] for _, ref in refs], linestyle=":",
                            marker="s", markersize=3, color=("black", "grey", "dimgrey")[j % 3],
                            label=f"accuracy {other}")
            _finish(ax, attack_axis_label(norm), "robust precision / recall (%)", f"{dataset}: {defense} vs {attack}")
    return figure


def save_figure(figure: Figure, folder: Path, stem: str) -> dict[str, Path]:
    """Write `<stem>.png` (200 dpi) and `<stem>.pdf` under folder; returns the paths."""
    paths = {"png": folder / f"{stem}.png", "pdf": folder / f"{stem}.pdf"}
    with publication_style():
        _write_figure(figure, paths["png"], dpi=200)
        _write_figure(figure, paths["pdf"])
    return paths


def _write_figure(figure: Figure, path: Path, **options: Any) -> None:
    """Render in memory, then write atomically (bench.core.atomic): a full disk never leaves half a figure."""
    rendered = io.BytesIO()
    # Tight bounding box: long axis labels and the outside legends are never clipped.
    figure.savefig(rendered, format=path.suffix[1:], bbox_inches="tight", **options)
    write_bytes(path, rendered.getbuffer())


@dataclass(frozen=True)
class Plot:
    """One figure of a report: the tables (bench.reporting.table_registry names) it reads and how it is drawn.

    `draw(frames, registry_names)` gets every table's long frame by name (plus "certified_defenses")
    and (dataset, defense label) -> registry name; it returns None when the run has nothing to show.
    """

    tables: tuple[str, ...]
    draw: Callable[[dict[str, Any], dict[tuple[str, str], str]], Figure | None]


PLOTS = Registry("figure")


def figures() -> list[tuple[str, Plot]]:
    """(file stem, plot) of every registered figure, by stem."""
    return [(stem, PLOTS.get(stem)) for stem in PLOTS.names()]


PLOTS.register("fig2_certified_accuracy", Plot(("certified",),
                                               lambda frames, names: plot_certified(frames["certified"])))
PLOTS.register("fig3_accuracy_vs_attack", Plot(("accuracy",),
                                               lambda frames, names: plot_accuracy_vs_attack(frames["accuracy"])))
PLOTS.register("fig4_defense_comparison", Plot(("accuracy",), lambda frames, names: plot_defense_comparison(
    frames["accuracy"], names)))
PLOTS.register("fig5_robust_precision_recall", Plot(("robust", "accuracy"), lambda frames, names: plot_robust(
    frames["robust"], frames["accuracy"], frames["certified_defenses"])))
