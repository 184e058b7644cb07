"""The paper's figures hold the right series, labels and values (not just a file on disk)."""
from __future__ import annotations

import numpy as np
import pytest

from bench.reporting.plots import (worst_curve, plot_accuracy_vs_attack, plot_certified, plot_defense_comparison,
                                   plot_robust, save_figure)
from bench.reporting.tables import WORST, accuracy_frame
from bench.reporting.tables_certified import certified_frame, robust_frame
from synthetic_runs import L_ATTACK, THRESHOLDS, cells_and_records

CERTIFIED = {("mnist5k", "pixeldp_L0.1"), ("mnist5k", "pixeldp_L0.3"), ("mnist5k", "wong_kolter")}


@pytest.fixture(scope="module")
def frames():
    cells = cells_and_records()
    return {"cells": cells, "accuracy": accuracy_frame(cells, L_ATTACK),
            "certified": certified_frame(cells, THRESHOLDS), "robust": robust_frame(cells, L_ATTACK)}


def legend_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_fig2_certified_accuracy_vs_threshold(frames):
    figure = plot_certified(frames["certified"])
    ax, linf = figure.axes  # L2 radii (PixelDP) and L-inf radii (convex) on separate panels
    assert ax.get_xlabel() == "threshold T (certified L2 radius, pixel range 1)"
    assert "L-inf radius" in linf.get_xlabel() and legend_labels(linf) == ["wong_kolter (convex)"]
    assert ax.get_ylabel() == "certified accuracy (%)"
    assert legend_labels(ax) == ["pixeldp_L0.1 (pixeldp)", "pixeldp_L0.3 (cohen)"]
    assert len(ax.get_lines()) == 2
    cert = frames["certified"]
    for line, defense in zip(ax.get_lines(), ["pixeldp_L0.1", "pixeldp_L0.3"], strict=True):
        rows = cert[cert["defense"] == defense].sort_values("threshold")
        assert list(line.get_xdata()) == THRESHOLDS
        assert np.allclose(line.get_ydata(), 100 * rows["certified_accuracy"])
    assert len(ax.collections) == 2  # one 95% band per line: n = 20 is a small sample


def test_bands_disappear_for_large_samples(frames):
    figure = plot_certified(frames["certified"], band_max_n=10)
    assert all(len(ax.collections) == 0 for ax in figure.axes)


def test_fig3_accuracy_vs_attack_per_defense(frames):
    figure = plot_accuracy_vs_attack(frames["accuracy"])
    assert len(figure.axes) == 5 * 2  # 5 defenses x {L2, L-inf}
    l2, linf = figure.axes[0], figure.axes[1]
    assert l2.get_title() == "mnist5k: undefended"
    assert "L2 norm" in l2.get_xlabel() and "L-inf norm" in linf.get_xlabel()
    assert l2.get_ylabel() == "accuracy under attack (%)"
    assert legend_labels(l2) == ["pgd_l2", "cw_l2", WORST]
    assert legend_labels(linf) == ["pgd_linf", WORST]  # one attack: its worst case is drawn on top of it
    acc = frames["accuracy"]
    clean = acc[(acc["defense"] == "undefended") & (acc["attack"] == "clean")]["accuracy"].item()
    pgd = acc[(acc["defense"] == "undefended") & (acc["attack"] == "pgd_linf")].sort_values("eps")
    line, worst = linf.get_lines()
    assert list(line.get_xdata()) == [0.0, 0.1, 0.3]  # the clean accuracy starts the fixed-eps curve
    assert np.allclose(line.get_ydata(), 100 * np.r_[clean, pgd["accuracy"]])
    assert np.allclose(worst.get_ydata(), line.get_ydata())
    cw = acc[(acc["defense"] == "undefended") & (acc["attack"] == "cw_l2")].sort_values("eps")
    assert np.allclose(l2.get_lines()[1].get_ydata(), 100 * cw["accuracy"])


def test_fig4_compares_defense_families_under_both_norms(frames):
    registry = {(c.dataset, c.defense_label): c.defense for c, _ in frames["cells"]}
    figure = plot_defense_comparison(frames["accuracy"], registry)
    l2, linf = figure.axes
    assert l2.get_title() == "mnist5k: L2 attacks" and linf.get_title() == "mnist5k: L-inf attacks"
    assert legend_labels(l2) == ["undefended", "madry", "pixeldp_L0.1", "pixeldp_L0.3", "convex: wong_kolter"]
    acc = frames["accuracy"]
    worst = acc[(acc["defense"] == "madry") & (acc["attack"] == WORST) & (acc["norm"] == "l2")
                & np.isclose(acc["eps"], 0.5)]["accuracy"].item()
    madry = l2.get_lines()[1]
    assert 0.5 in list(madry.get_xdata())
    assert madry.get_ydata()[list(madry.get_xdata()).index(0.5)] == pytest.approx(100 * worst)
    assert plot_defense_comparison(frames["accuracy"], {k: "undefended" for k in registry}) is None


def test_fig5_robust_precision_recall(frames):
    figure = plot_robust(frames["robust"], frames["accuracy"], CERTIFIED)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert len(visible) == 2 * 2 + 1  # PixelDP (L2 radii) x 2 L2 attacks + convex (L-inf) x PGD L-inf
    ax = next(a for a in visible if a.get_title() == "mnist5k: pixeldp_L0.1 vs cw_l2")
    assert legend_labels(ax) == ["precision, T=0.05", "recall, T=0.05", "precision, T=0.1", "recall, T=0.1",
                                 "accuracy undefended", "accuracy madry"]
    assert ax.get_ylabel() == "robust precision / recall (%)"
    robust = frames["robust"]
    rows = robust[(robust["defense"] == "pixeldp_L0.1") & (robust["attack"] == "cw_l2")
                  & (robust["threshold"] == 0.05)].sort_values("eps")
    precision, recall = ax.get_lines()[0], ax.get_lines()[1]
    assert list(precision.get_xdata()) == L_ATTACK["l2"]
    assert np.allclose(precision.get_ydata(), 100 * rows["precision"])
    assert np.allclose(recall.get_ydata(), 100 * rows["recall"])
    assert recall.get_linestyle() == "--"


def test_figures_without_data_are_skipped(frames):
    empty = frames["certified"].iloc[0:0]
    assert plot_certified(empty) is None
    assert plot_robust(frames["robust"].iloc[0:0], frames["accuracy"], set()) is None


def test_save_writes_png_and_pdf(frames, tmp_path):
    paths = save_figure(plot_certified(frames["certified"]), tmp_path, "fig2")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["pdf"].read_bytes()[:5] == b"%PDF-"


def test_fig4_worst_line_is_never_above_a_measured_attack(frames):
    """Issue 27: the worst-case line passed above APGD's measured point where only APGD ran a budget."""
    registry = {(c.dataset, c.defense_label): c.defense for c, _ in frames["cells"]}
    acc = frames["accuracy"]
    for norm in ("l2", "linf"):
        for defense in sorted(set(acc["defense"])):
            curve = worst_curve(acc, "mnist5k", defense, norm)
            attacks = acc[(acc["defense"] == defense) & (acc["norm"] == norm) & (acc["attack"] != WORST)]
            for eps, group in attacks.groupby("eps"):
                point = curve[np.isclose(curve["eps"], eps)]
                assert len(point) == 1 and point["accuracy"].item() <= group["accuracy"].min() + 1e-12
    assert plot_defense_comparison(acc, registry) is not None
