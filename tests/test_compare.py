"""`compare` lines up runs example by example, flags a sabotaged model and passes an identical rerun."""
from __future__ import annotations

import json
import math
import tomllib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pixeldp_bench
from bench.reporting.baseline import export_run, load_export
from bench.cli.commands import main
from bench.reporting.compare import (Outcomes, compare_outcomes, holm, missing_from_new, only_common, open_run,
                                     paired_test, run_outcomes)
from bench.core.data import REPO_ROOT
from bench.execution.store import Store
from synthetic_runs import fill_store

TINY = """
[run]
datasets = ["mnist5k"]
examples = 100
seed = 0
l_attack = {{ linf = [0.0, 0.1] }}

[defenses.undefended]
params = {{ arch = "cnn_small", steps = {steps}, batch_size = 64, lr = 1e-3 }}

[attacks.pgd_linf]
eps = [0.1]
params = {{ steps = 5 }}
"""


def run_tiny(results: Path, steps: int) -> Path:
    """Run the tiny profile (undefended CNN trained for `steps` steps) into `results`; returns the run's folder."""
    return pixeldp_bench.run(tomllib.loads(TINY.format(steps=steps)), results=results, quiet=True).folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A base run, an identical rerun in a fresh results folder, and a sabotaged run (2 training steps)."""
    folders = {}
    for name, steps in (("base", 100), ("rerun", 100), ("weak", 2)):
        results = tmp_path_factory.mktemp(name)
        folders[name] = run_tiny(results, steps)
    return folders


@pytest.mark.slow
def test_compare_flags_a_weakened_model(runs, capsys):
    assert main(["compare", str(runs["base"]), str(runs["weak"])]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "clean" in out
    assert "defense_params" in out and "'steps': 100" in out  # the sabotaged setting is named


@pytest.mark.slow
def test_compare_passes_an_identical_rerun(runs, capsys, tmp_path):
    assert main(["compare", str(runs["base"]), str(runs["rerun"]), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 regression(s)" in out and "3 within tolerance" in out  # clean, PGD at 0.1, worst case at 0.1
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert list(table["test"]) == ["mcnemar"] * 3 and (table["delta"] == 0).all()  # bit-identical rerun


@pytest.mark.slow
def test_a_baseline_export_compares_like_the_store(runs, tmp_path, capsys):
    assert main(["baseline", str(runs["base"]), "--out", str(tmp_path / "smoke")]) == 0
    assert (tmp_path / "smoke" / "tables.md").read_text().count("undefended") >= 1
    assert main(["compare", str(tmp_path / "smoke"), str(runs["rerun"])]) == 0
    assert main(["compare", str(tmp_path / "smoke" / "baseline.json"), str(runs["weak"])]) == 1


def test_export_round_trip_keeps_every_record(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    run_id = fill_store(store)
    path = export_run(store, run_id, tmp_path / "baseline.json")
    copy, copy_id = load_export(path)
    assert copy_id == run_id and copy.run_info(run_id)["settings"] == store.run_info(run_id)["settings"]
    for (key, cell), (key2, cell2) in zip(store.run_cells(run_id), copy.run_cells(run_id), strict=True):
        assert key == key2 and cell == cell2
        assert store.records(key) == copy.records(key)
        assert store.cell_info(key) == copy.cell_info(key)
    assert any(math.isinf(r.norm) for key, _ in copy.run_cells(run_id) for r in copy.records(key))
    frame = compare_outcomes(run_outcomes(store, run_id), run_outcomes(copy, run_id))
    assert set(frame["status"]) == {"ok"} and (frame["delta"] == 0).all()
    assert set(frame["table"]) == {"accuracy", "certified accuracy", "robust recall"}
    assert json.loads(path.read_text())["format"] == "pixeldp-bench-run/1"


def test_open_run_accepts_ids_folders_and_exports(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    run_id = fill_store(store)
    (tmp_path / run_id).mkdir()
    assert open_run(run_id, tmp_path)[1] == run_id
    assert open_run(str(tmp_path / run_id), Path("/nonexistent"))[1] == run_id
    assert open_run(str(tmp_path), Path("/nonexistent"))[1] == run_id  # a results folder: its latest run
    export_run(store, run_id, tmp_path / "export" / "baseline.json")
    assert open_run(str(tmp_path / "export"), Path("/nonexistent"))[1] == run_id


def test_mcnemar_exact_p_values_by_hand():
    base = {i: True for i in range(10)}
    assert paired_test(base, {i: False for i in range(10)}) == ("mcnemar", pytest.approx(2 * 0.5 ** 10))
    assert paired_test(base, dict(base)) == ("mcnemar", 1.0)
    # 3 lost, 1 won: two-sided binomial P(X <= 1 | n=4) * 2 = 2 * 5/16.
    new = dict(base) | {0: False, 1: False, 2: False}
    base[9] = False
    assert paired_test(base, new)[1] == pytest.approx(2 * 5 / 16)


def test_independent_samples_use_a_two_proportion_test():
    base = {i: i < 50 for i in range(100)}
    new = {1000 + i: i < 10 for i in range(100)}
    test, p = paired_test(base, new)
    assert test == "fisher" and p < 1e-8


def test_holm_adjustment():
    assert np.allclose(holm(np.array([0.01, 0.04, 0.03])), [0.03, 0.06, 0.06])


def test_tolerance_and_alpha_decide_the_status():
    from bench.reporting.compare import Outcomes

    base = Outcomes({("accuracy", "d", "m", "clean"): {i: i < 90 for i in range(100)}}, {})
    new = Outcomes({("accuracy", "d", "m", "clean"): {i: i < 80 for i in range(100)}}, {})
    assert compare_outcomes(base, new)["status"].item() == "REGRESSION"  # 10 points, p = 0.002
    assert compare_outcomes(base, new, tolerance=0.15)["status"].item() == "ok"
    assert compare_outcomes(base, new, alpha=0.001)["status"].item() == "ok"
    assert compare_outcomes(new, base)["status"].item() == "improved"
    only = compare_outcomes(base, Outcomes({}, {}))
    assert only["status"].item() == "only in base"


def _partial_smoke_run(results: Path, keep: int) -> None:
    """A store whose one run holds only the first `keep` cells of the committed smoke baseline."""
    base, run_id = load_export(REPO_ROOT / "results" / "baselines" / "smoke" / "baseline.json")
    info = base.run_info(run_id)
    cells = base.run_cells(run_id)[:keep]
    store = Store(results / "store.sqlite")
    store.start_run("partial", info["profile"], info["settings"], info["environment"], cells)
    for key, cell in cells:
        store.write_cell(key, cell, base.records(key), base.cell_info(key) or {})
    store.close()


def test_compare_fails_when_the_new_run_lacks_base_cells(tmp_path, capsys):
    """Issue 27: a gate that passed on a run covering 1% of the baseline must fail, naming the cells."""
    _partial_smoke_run(tmp_path, keep=2)
    baseline = str(REPO_ROOT / "results" / "baselines" / "smoke")
    assert main(["compare", baseline, str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pixeldp-bench: compare failed: the new run lacks ")
    assert "--only-common" in err[0] and "accuracy" in err[0]
    # Asked for the intersection, it compares the 2 cells' table entries and says what it left out.
    assert main(["compare", baseline, str(tmp_path), "--only-common"]) == 0
    out = capsys.readouterr().out
    assert "--only-common: compared only the" in out
    summary = [line for line in out.splitlines() if line.startswith("--only-common")][0]
    compared, left = int(summary.split("the ")[1].split()[0]), int(summary.split("left out ")[1].split()[0])
    assert 0 < compared < left


def test_only_common_keeps_new_only_cells_out_and_a_superset_passes(tmp_path, capsys):
    """A new run with every base cell (and more) passes without --only-common."""
    base = Outcomes(OrderedDict({("t", "d", "m", "a"): {0: True, 1: True}}), {})
    new = Outcomes(OrderedDict({("t", "d", "m", "a"): {0: True, 1: True}, ("t", "d", "m", "b"): {0: False}}), {})
    frame = compare_outcomes(base, new)
    assert missing_from_new(frame) is None
    common, only_base, only_new = only_common(frame)
    assert (len(common), only_base, only_new) == (1, 0, 1)
    assert missing_from_new(compare_outcomes(new, base)).startswith("the new run lacks 1 of the base's 2 table cells")
