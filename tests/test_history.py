"""`history`: metrics across a profile's stored runs (three faked commits), a planted drop marked REGRESSION."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import pixeldp_bench
from bench.cli.commands import main
from bench.core.types import Cell, Record
from bench.execution.keys import cell_key
from bench.execution.store import Store
from bench.reporting.history import format_history, run_history
from synthetic_runs import store_run

N = 40
SETTINGS = {"name": "tiny", "batch_size": 40, "l_attack": {"linf": [0.1]}, "thresholds": []}
COMMITS = ("1111111111aaaaaaaaaa", "2222222222bbbbbbbbbb", "3333333333cccccccccc+dirty")
WORST = "mnist5k/undefended/worst_case/linf@0.1"
CLEAN = "mnist5k/undefended/clean"
PGD = "mnist5k/undefended/attacks/pgd_linf@0.1"


def undefended_run(steps: int, robust: int, clean: int = 36) -> list[tuple[Cell, list[Record], dict]]:
    """An undefended model trained `steps` steps (its cells' key): `clean` of N correct, `robust` of those under PGD."""
    common = dict(dataset="mnist5k", defense="undefended", defense_params={"steps": steps}, examples=N, seed=0,
                  defense_label="undefended")

    def records(held: int) -> list[Record]:
        return [Record(index=i, label=i % 10, clean_pred=i % 10 if i < clean else (i + 1) % 10,
                       adv_pred=i % 10 if i < held else (i + 2) % 10, norm=0.05, radius=None, seconds=0.001,
                       forward_passes=1) for i in range(N)]

    info = {"defense": {"train_steps": steps, "train_seconds_per_step": 0.1}}
    return [(Cell(attack="none", **common), records(clean), info),
            (Cell(attack="pgd", norm="linf", eps=0.1, attack_label="pgd_linf", **common), records(robust), info)]


def store_runs(results, runs) -> list[str]:
    """Each (profile, commit, run) stored in order (their creation times increase); returns the run ids."""
    store = Store(results / "store.sqlite")
    ids = [store_run(store, f"{profile}-{i}", run, profile=profile, settings=SETTINGS,
                     environment={"package_version": f"0.{i}.0", "git_commit": commit})
           for i, (profile, commit, run) in enumerate(runs, start=1)]
    store.close()
    return ids


@pytest.fixture
def results(tmp_path):
    """Three runs of profile "tiny": a model, the same model rerun (its cells reused), a weakened one."""
    store_runs(tmp_path, [("other", None, undefended_run(7, 30)),
                          *(("tiny", c, r) for c, r in zip(COMMITS, (undefended_run(100, 30), undefended_run(100, 30),
                                                                       undefended_run(2, 10)), strict=True))])
    return tmp_path


def test_three_runs_give_three_points_per_metric_and_the_drop_is_marked(results):
    store = Store(results / "store.sqlite", readonly=True)
    frame = run_history(store)  # default: the latest run's profile, its worst-case accuracies
    assert list(frame["metric"]) == [WORST] * 3 and frame["value"].notna().sum() == 3
    assert list(frame["run_id"]) == ["tiny-2", "tiny-3", "tiny-4"] and frame["created"].is_monotonic_increasing
    assert list(frame["git_commit"]) == list(COMMITS) and list(frame["package_version"]) == ["0.2.0", "0.3.0", "0.4.0"]
    assert np.allclose(frame["value"], [0.75, 0.75, 0.25]) and list(frame["n"]) == [N] * 3
    assert list(frame["status"]) == ["", "ok", "REGRESSION"]

    chosen = run_history(store, metrics=[CLEAN, PGD + "/accuracy", "mnist5k/undefended/overhead/train_steps"])
    store.close()
    by_metric = {m: list(part["status"]) for m, part in chosen.groupby("metric", sort=False)}
    assert by_metric == {CLEAN: ["", "ok", "ok"], PGD: ["", "ok", "REGRESSION"],
                         "mnist5k/undefended/overhead/train_steps": ["", "", ""]}  # no test for a count
    assert chosen.groupby("metric")["value"].count().tolist() == [3, 3, 3]
    assert list(chosen["value"].iloc[-3:]) == [100, 100, 2]

    text = format_history(frame)
    lines = [line for line in text.splitlines() if "tiny-" in line]
    assert len(lines) == 3 and lines[-1].rstrip().endswith("REGRESSION") and "3333333333cc+dirty" in lines[-1]
    assert "25.0 [" in lines[-1] and "1 regression(s) in 1 metric(s)" in text


def test_history_command_writes_text_csv_and_plot(results, capsys):
    assert main(["history", str(results), "--metric", PGD, CLEAN]) == 0
    out = capsys.readouterr().out
    assert "history of profile tiny: 3 run(s)" in out and out.count("REGRESSION") == 2  # the header names it once
    for suffix in ("txt", "csv", "png", "pdf"):
        assert (results / f"history_tiny.{suffix}").stat().st_size > (1000 if suffix in ("png", "pdf") else 0)
    written = pd.read_csv(results / "history_tiny.csv")
    assert len(written) == 6 and list(written["status"].fillna("")).count("REGRESSION") == 1

    assert main(["history", str(results), "--profile", "other"]) == 0
    assert "history of profile other: 1 run(s)" in capsys.readouterr().out


def test_the_api_gives_the_same_frame(results, tmp_path):
    frame = pixeldp_bench.history(results=results, metrics=[PGD], out=tmp_path / "out")
    assert list(frame["status"]) == ["", "ok", "REGRESSION"] and (tmp_path / "out" / "history_tiny.png").exists()
    assert list(frame.columns) == ["metric", "run_id", "created", "profile", "git_commit", "package_version", "value",
                                   "low", "high", "n", "status"]


def test_user_mistakes_are_one_line(results, tmp_path, capsys):
    assert main(["history", str(results), "--metric", "mnist5k/undefended/attacks/pgd_linf@0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'mnist5k/undefended/attacks/pgd_linf@0.1'" in err
    assert main(["history", str(results), "--profile", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no run of profile 'nope'" in err and "its profiles are other, tiny" in err
    assert main(["history", str(tmp_path / "empty")]) == 2
    assert "no results store at" in capsys.readouterr().err
    assert main(["history", str(results), "--last", "0"]) == 2


def test_an_incomplete_run_is_skipped_as_a_base(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    store_run(store, "tiny-1", undefended_run(100, 30), profile="tiny", settings=SETTINGS)
    killed = undefended_run(3, 10)
    store.start_run("tiny-2", "tiny", SETTINGS, {}, [(cell_key(cell, {}), cell) for cell, _, _ in killed])
    store.write_cell(cell_key(killed[0][0], {}), killed[0][0], killed[0][1], {})  # its PGD cell never finished
    store_run(store, "tiny-3", undefended_run(100, 30), profile="tiny", settings=SETTINGS)
    frame = run_history(store, metrics=[CLEAN])
    store.close()
    assert list(frame["status"]) == ["", "incomplete", "ok"]  # tiny-3 is compared with tiny-1


def test_the_report_adds_the_history_once_the_profile_has_earlier_runs(results, capsys):
    assert main(["report", "tiny-2", "--results", str(results)]) == 0
    assert "history of" not in capsys.readouterr().out and not (results / "tiny-2" / "history.txt").exists()
    assert main(["report", "tiny-4", "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert "history of the last 3 runs of profile tiny: 1 regression(s)" in out
    assert (results / "tiny-4" / "history.png").stat().st_size > 1000
    assert "REGRESSION" in (results / "tiny-4" / "history.txt").read_text()
    assert (results / "tiny-4" / "metrics.json").exists()
