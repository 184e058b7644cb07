"""Golden-file tests of every table (CSV, Markdown, LaTeX) on a fixed synthetic set of records."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.reporting.tables import (WORST, accuracy_frame, accuracy_pivot, latex_escape, to_latex, to_text,
                                    write_accuracy_tables, write_table)
from bench.reporting.tables_certified import (CERTIFIED_CAPTION, ROBUST_CAPTION, certified_frame, certified_pivot,
                                              certifier_name, robust_frame, robust_pivot)
from bench.reporting.tables_overhead import overhead_caption, overhead_frame, overhead_pivot
from bench.core.types import Cell, Record
from synthetic_runs import ENVIRONMENT, L_ATTACK, THRESHOLDS, cells_and_records, synthetic_run

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("PIXELDP_BENCH_UPDATE_GOLDEN") == "1"  # set to rewrite the golden files
TABLES = ("accuracy_under_attack", "certified_accuracy", "robust_precision_recall", "overhead")


@pytest.fixture(scope="module")
def frames():
    cells = cells_and_records()
    accuracy = accuracy_frame(cells, L_ATTACK)
    certified = certified_frame(cells, THRESHOLDS)
    robust = robust_frame(cells, L_ATTACK)
    overhead = overhead_frame(synthetic_run(), ENVIRONMENT["device_name"])
    return {"accuracy": accuracy, "certified": certified, "robust": robust, "overhead": overhead,
            "certified_defenses": {("mnist5k", "pixeldp_L0.1"), ("mnist5k", "pixeldp_L0.3"),
                                   ("mnist5k", "wong_kolter")}}


@pytest.fixture(scope="module")
def written(frames, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tables")
    write_accuracy_tables(frames["accuracy"], folder)
    write_table(frames["certified"], certified_pivot(frames["certified"]), folder, "certified_accuracy",
                CERTIFIED_CAPTION)
    write_table(frames["robust"], robust_pivot(frames["robust"], frames["accuracy"], frames["certified_defenses"]),
                folder, "robust_precision_recall", ROBUST_CAPTION)
    write_table(frames["overhead"], overhead_pivot(frames["overhead"]), folder, "overhead",
                overhead_caption(ENVIRONMENT["device_name"]))
    return folder


@pytest.mark.parametrize("suffix", ["md", "csv", "tex"])
@pytest.mark.parametrize("table", TABLES)
def test_table_matches_golden_file(written, table, suffix):
    produced = (written / f"{table}.{suffix}").read_text()
    golden = GOLDEN / f"{table}.{suffix}"
    if UPDATE:
        golden.write_text(produced)
    assert golden.exists(), f"missing golden file {golden}; run with PIXELDP_BENCH_UPDATE_GOLDEN=1"
    assert produced == golden.read_text()


def test_worst_case_is_the_per_example_minimum(frames):
    acc = frames["accuracy"]
    for defense in ("undefended", "madry", "pixeldp_L0.1", "wong_kolter"):
        at = acc[(acc["defense"] == defense) & (acc["norm"] == "l2") & np.isclose(acc["eps"], 0.5)]
        worst = at.loc[at["attack"] == WORST, "correct"].item()
        assert worst <= at.loc[at["attack"] != WORST, "correct"].min()
    # Recomputed by hand from the records: correct under PGD at 0.5 AND CW's smallest adversarial > 0.5.
    records = {(c.defense_label, c.attack_label): r for c, r in cells_and_records()}
    pgd = {r.index: r.clean_pred == r.label == r.adv_pred for r in records[("madry", "pgd_l2")]}
    cw = {r.index: r.clean_pred == r.label and r.norm > 0.5 for r in records[("madry", "cw_l2")]}
    expected = sum(pgd[i] and cw[i] for i in pgd)
    madry_worst = acc[(acc["defense"] == "madry") & (acc["attack"] == WORST) & (acc["norm"] == "l2")
                      & np.isclose(acc["eps"], 0.5)]
    assert madry_worst["correct"].item() == expected
    assert expected < min(sum(pgd.values()), sum(cw.values()))  # the synthetic data make the AND matter


def test_certified_accuracy_counts_correct_and_certified(frames):
    cert = frames["certified"]
    cells = dict(((c.defense_label, c.attack), r) for c, r in cells_and_records())
    records = cells[("pixeldp_L0.1", "none")]
    for t in THRESHOLDS:
        expected = sum(r.clean_pred == r.label and r.radius >= t for r in records)
        row = cert[(cert["defense"] == "pixeldp_L0.1") & (cert["threshold"] == t)]
        assert row["certified"].item() == expected
        assert row["n"].item() == len(records)
    # T = 0 is the clean accuracy of the certified predictor; it can only fall as T grows.
    clean = frames["accuracy"]
    assert cert.loc[cert["threshold"] == 0, "certified"].tolist() == clean.loc[
        (clean["attack"] == "clean") & clean["defense"].isin(set(cert["defense"])), "correct"].tolist()
    for _, group in cert.groupby("defense"):
        assert list(group["certified"]) == sorted(group["certified"], reverse=True)
    assert set(cert["certifier"]) == {"pixeldp", "cohen", "convex"}
    assert dict(zip(cert["defense"], cert["norm"], strict=True)) == {"pixeldp_L0.1": "l2", "pixeldp_L0.3": "l2",
                                                        "wong_kolter": "linf"}
    # Radii in one norm never judge attacks in another: PixelDP (L2) has no L-inf rows, convex no L2 rows.
    robust = frames["robust"]
    assert set(robust.loc[robust["defense"] == "wong_kolter", "norm"]) == {"linf"}
    assert set(robust.loc[robust["defense"].str.startswith("pixeldp"), "norm"]) == {"l2"}
    assert "undefended" not in set(cert["defense"])


def test_robust_precision_and_recall_definitions(frames):
    robust = frames["robust"]
    # The minimum-norm attack at L_attack = 0 leaves the clean predictions: recall equals certified accuracy.
    at_zero = robust[(robust["attack"] == "cw_l2") & (robust["eps"] == 0.0)]
    cert = frames["certified"]
    for row in at_zero.itertuples():
        match = cert[(cert["defense"] == row.defense) & np.isclose(cert["threshold"], row.threshold)]
        assert row.robust_correct == match["certified"].item()
    assert (robust["recall"] <= robust["precision"].fillna(1.0) + 1e-12).all()
    assert np.allclose(robust["recall"], robust["robust_correct"] / robust["n"])
    ok = robust["certified"] > 0
    assert np.allclose(robust.loc[ok, "precision"], robust.loc[ok, "robust_correct"] / robust.loc[ok, "certified"])


def test_robust_pivot_shows_non_certified_defenses_on_the_same_attack(frames):
    wide = robust_pivot(frames["robust"], frames["accuracy"], frames["certified_defenses"])
    assert {"acc undefended", "acc madry"} <= set(wide.columns)
    assert not any(c.startswith("acc pixeldp") or c == "acc wong_kolter" for c in wide.columns)
    row = wide[(wide["defense"] == "wong_kolter") & (wide["attack"] == "pgd_linf") & (wide["eps"] == "0.3")]
    acc = frames["accuracy"]
    madry = acc[(acc["defense"] == "madry") & (acc["attack"] == "pgd_linf") & np.isclose(acc["eps"], 0.3)]
    assert row["acc madry"].item().startswith(f"{100 * madry['accuracy'].item():.1f} [")


def test_overhead_relative_training_cost_and_draws(frames):
    over = frames["overhead"].set_index("defense")
    assert over.loc["madry", "train_relative"] == pytest.approx(20.0)
    assert over.loc["pixeldp_L0.1", "train_relative"] == pytest.approx(1.1)
    assert over.loc["pixeldp_L0.1", "predict_s_1000"] == pytest.approx(0.028)
    assert np.isnan(over.loc["undefended", "predict_s_1000"])  # deterministic: one draw only
    assert np.isnan(over.loc["madry", "certify_s"])
    assert over.loc["pixeldp_L0.3", "passes cw_l2"] == 900
    assert set(over["device"]) == {ENVIRONMENT["device_name"]}


def test_certifier_names_default_by_defense():
    assert certifier_name(Cell("d", "pixeldp", "none")) == "pixeldp"
    assert certifier_name(Cell("d", "wong_kolter", "none")) == "convex"
    assert certifier_name(Cell("d", "pixeldp", "none", defense_params={"certifier": "cohen"})) == "cohen"


def test_empty_denominator_shows_a_dash():
    cell = Cell("d", "pixeldp", "pgd_l2", norm="l2", eps=0.5)
    clean = Cell("d", "pixeldp", "none")
    records = [Record(i, 0, 0, 0, 0.1, 0.0, 0.0, 1) for i in range(3)]
    robust = robust_frame([(clean, records), (cell, records)], {"l2": [0.5]}, thresholds=(0.05,))
    assert robust["certified"].item() == 0 and np.isnan(robust["precision"].item())
    wide = robust_pivot(robust, pd.DataFrame(columns=["dataset", "defense", "attack", "norm", "eps"]), set())
    assert wide["P@0.05"].item() == "-"


def test_latex_escapes_specials_and_aligns_numbers():
    table = pd.DataFrame({"name": ["a_b & 50%"], "n": [3]})
    tex = to_latex(table, "cap $x$", "t")
    assert r"a\_b \& 50\%" in tex and r"\caption{cap \$x\$}" in tex
    assert r"\begin{tabular}{lr}" in tex
    assert latex_escape("{~}") == r"\{\textasciitilde{}\}"


def test_a_single_attack_budget_still_gets_its_worst_case_column():
    """Issue 27: the worst case exists at every budget any attack reached, equal to a lone attack's row."""
    cell = Cell("d", "undefended", "none")
    attacked = Cell("d", "undefended", "pgd_linf", norm="linf", eps=0.1)
    records = [Record(i, 1, 1, int(i % 2), 0.1, None, 0.0, 1) for i in range(4)]
    wide = accuracy_pivot(accuracy_frame([(cell, records), (attacked, records)], {}))
    assert list(wide.columns) == ["dataset", "defense", "n", "clean", "pgd_linf linf=0.1", f"{WORST} linf=0.1"]
    assert wide["pgd_linf linf=0.1"].item().startswith("50.0 [")
    assert wide[f"{WORST} linf=0.1"].item() == wide["pgd_linf linf=0.1"].item()


def test_worst_case_is_at_every_attacked_budget_and_never_above_an_attack(frames):
    """Every (defense, norm, eps) that any attack reached has a worst-case row, at or below each attack there."""
    acc = frames["accuracy"]
    attacked = acc[(acc["norm"] != "") & (acc["attack"] != WORST)]
    for (defense, norm, eps), group in attacked.groupby(["defense", "norm", "eps"]):
        worst = acc[(acc["defense"] == defense) & (acc["attack"] == WORST) & (acc["norm"] == norm)
                    & np.isclose(acc["eps"], eps)]
        assert len(worst) == 1, (defense, norm, eps)
        assert worst["correct"].item() <= group["correct"].min()


def test_overhead_hides_draw_columns_no_defense_measured(frames):
    deterministic = frames["overhead"][~frames["overhead"]["defense"].str.startswith("pixeldp")]
    columns = list(overhead_pivot(deterministic).columns)
    assert "predict s/img @1" in columns and "predict s/img @1000" not in columns
    assert "certify s/img" in columns  # the convex defense certifies


def test_terminal_text_wraps_wide_tables_by_column_blocks():
    """Issue 27: the smoke accuracy table printed 799 characters wide; blocks repeat the key columns."""
    wide = pd.DataFrame({"dataset": ["mnist"] * 2, "defense": ["undefended", "pixeldp_L0.1"], "n": [200, 100]}
                        | {f"attack_{i} l2={i}": ["97.5 [94.3, 99.2]", "-"] for i in range(12)})
    text = to_text(wide, width=100)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    headers = [line for line in lines if line.startswith("dataset")]
    assert len(headers) > 1 and all(h.split()[:3] == ["dataset", "defense", "n"] for h in headers)
    # Every value column is shown exactly once, in order.
    shown = [c for h in headers for c in re.findall(r"attack_\d+ l2=\d+", h)]
    assert shown == [c for c in wide.columns if c.startswith("attack_")]
    narrow = wide.iloc[:, :5]
    assert to_text(narrow, width=100) == narrow.to_string(index=False) + "\n"


def test_column_blocks_are_those_of_rendering_every_trial_block():
    """to_text measures each column once; its blocks are the greedy ones that rendering each grown block gives."""
    keys = {"dataset": ["mnist"] * 3, "defense": ["undefended", "pixeldp_L0.1", "madry"], "n": [200, 9, 50]}
    wide = pd.DataFrame(keys | {f"{'attack' * (i % 3 + 1)}_{i}": [i * 1.5, -i, "97.5 [94.3, 99.2]"[:i + 1]]
                                for i in range(15)})
    values = list(wide.columns[3:])
    for width in (40, 60, 80, 100, 150):
        blocks: list[list[str]] = []
        for column in values:
            trial = (blocks[-1] if blocks else []) + [column]
            if blocks and max(map(len, wide[list(keys) + trial].to_string(index=False).splitlines())) <= width:
                blocks[-1].append(column)
            else:
                blocks.append([column])
        expected = "\n".join(wide[list(keys) + block].to_string(index=False) + "\n" for block in blocks)
        assert to_text(wide, width=width) == expected, width
