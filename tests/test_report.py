"""`write_report` and `pixeldp-bench report` regenerate every table and figure from the store alone."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from bench.cli.commands import build_parser, main
from bench.reporting.report import run_frames, write_report
from bench.execution.store import Store
from synthetic_runs import SETTINGS, fill_store, synthetic_run

TABLES = ("accuracy_under_attack", "certified_accuracy", "robust_precision_recall", "overhead")
FIGURES = ("fig2_certified_accuracy", "fig3_accuracy_vs_attack", "fig4_defense_comparison",
           "fig5_robust_precision_recall")


@pytest.mark.slow
def test_report_regenerates_everything_from_the_store(tmp_path, capsys):
    results = tmp_path / "results"
    store = Store(results / "store.sqlite")
    run_id = fill_store(store)
    frames = run_frames(store, run_id)
    store.close()
    expected = {t: frames[f].to_csv(index=False, float_format="%.6g")
                for t, f in zip(TABLES, ("accuracy", "certified", "robust", "overhead"), strict=True)}
    assert not (results / run_id).exists()  # nothing but the store

    assert main(["report", run_id, "--results", str(results)]) == 0
    out = capsys.readouterr().out
    folder = results / run_id
    for table in TABLES:
        for suffix in ("csv", "md", "tex"):
            assert (folder / f"{table}.{suffix}").stat().st_size > 0, (table, suffix)
        assert (folder / f"{table}.csv").read_text() == expected[table]
    for figure in FIGURES:
        for suffix in ("png", "pdf"):
            assert (folder / "figures" / f"{figure}.{suffix}").stat().st_size > 1000
    assert "Certified accuracy" in out and "Robust precision" in out and "Overhead" in out
    assert "Test CPU (1 threads)" in " ".join(out.split())  # the overhead's machine, in the wrapped caption

    info = json.loads((folder / "run.json").read_text())
    assert info["settings"] == SETTINGS and info["environment"]["device_name"] == "Test CPU (1 threads)"
    config = json.loads((folder / "config.json").read_text())
    assert len(config) == len(synthetic_run())
    assert {c["seed"] for c in config} == {0} and all("key" in c and "defense_params" in c for c in config)

    certified = pd.read_csv(folder / "certified_accuracy.csv")
    assert len(certified) == 3 * len(SETTINGS["thresholds"])  # 2 PixelDP + 1 convex defense
    assert (frames["certified"]["certified"].to_numpy() == certified["certified"].to_numpy()).all()


def test_report_thresholds_are_configurable(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    run_id = fill_store(store)
    robust = run_frames(store, run_id, robust_thresholds=(0.2,))["robust"]
    # PixelDP x 2: PGD L2 at 0.5 + CW at 3 L_attack; convex: PGD L-inf at 2 eps (its radii are L-inf).
    assert set(robust["threshold"]) == {0.2} and len(robust) == 2 * (1 + 3) + 2
    args = build_parser().parse_args(["report", str(tmp_path / run_id), "--robust-thresholds", "0.05", "0.2"])
    assert args.robust_thresholds == [0.05, 0.2]


def test_unfinished_cells_are_reported(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    run = synthetic_run()
    fill_store(store, "partial", finished=5)
    report = write_report(store, "partial", tmp_path / "partial")
    assert report["text"].startswith(f"INCOMPLETE RUN: {len(run) - 5} of {len(run)} cell(s) have no results")
    assert (tmp_path / "partial" / "checks.txt").read_text().startswith("INCOMPLETE RUN")
