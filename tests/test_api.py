"""The Python API (pixeldp_bench): the CLI's records and tables, dict profiles, load_run, compare."""
from __future__ import annotations

import subprocess
import sys
import tomllib

import pandas as pd
import pytest

import pixeldp_bench
from bench.cli.commands import main
from bench.profile.config import ConfigError
from bench.core.data import REPO_ROOT
from bench.reporting.table_registry import tables
from pixeldp_bench import Run, load_run

TINY_TOML = """
[run]
datasets = ["mnist5k"]
examples = 40
l_attack = { linf = [0.0, 0.1] }

[defenses.undefended]
params = { arch = "cnn_small", steps = 30, batch_size = 32, lr = 1e-3 }

[attacks.pgd_linf]
eps = [0.1]
params = { steps = 3 }
"""
TINY = {"run": {"datasets": ["mnist5k"], "examples": 40, "l_attack": {"linf": [0.0, 0.1]}},
        "defenses": {"undefended": {"params": {"arch": "cnn_small", "steps": 30, "batch_size": 32, "lr": 1e-3}}},
        "attacks": {"pgd_linf": {"eps": [0.1], "params": {"steps": 3}}}}
TIMINGS = "overhead"  # the one table of wall-clock times: equal runs differ there


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """The tiny profile run through the API and through `pixeldp-bench run`, same seed, two results folders."""
    folder = tmp_path_factory.mktemp("api")
    (folder / "tiny.toml").write_text(TINY_TOML)
    api = pixeldp_bench.run(folder / "tiny.toml", results=folder / "api", seed=0, device="cpu", quiet=True)
    assert main(["run", str(folder / "tiny.toml"), "--results", str(folder / "cli"), "--seed", "0", "--device", "cpu",
                 "--quiet"]) == 0
    return {"api": api, "cli": load_run(folder / "cli")}


def test_the_dict_is_the_toml():
    assert tomllib.loads(TINY_TOML) == TINY


def test_api_and_cli_compute_the_same_records_and_tables(runs):
    api, cli = runs["api"], runs["cli"]
    assert [key for key, _ in api.store.run_cells(api.run_id)] == [key for key, _ in cli.store.run_cells(cli.run_id)]
    assert len(api.records) == 40 * 2
    pd.testing.assert_frame_equal(api.records.drop(columns="seconds"), cli.records.drop(columns="seconds"))
    written = sorted(p.name for p in api.folder.glob("*.csv"))
    assert written == sorted(p.name for p in cli.folder.glob("*.csv")) and "accuracy_under_attack.csv" in written
    for name in written:
        if name != f"{TIMINGS}.csv":
            assert (api.folder / name).read_text() == (cli.folder / name).read_text(), name


def test_tables_are_the_frames_of_the_csv_files(runs):
    run = runs["api"]
    assert list(run.tables) == [name for name, _ in tables()]
    for name, table in tables():
        path = run.folder / f"{table.stem}.csv"
        frame = run.tables[name]
        assert path.exists() == (not frame.empty or table.write_empty), name
        if path.exists():
            assert frame.to_csv(index=False, float_format="%.6g") == path.read_text(), name
    assert set(run.records.columns) >= {"dataset", "defense_label", "attack_label", "norm", "eps", "index", "label",
                                        "clean_pred", "adv_pred", "perturbation_norm", "radius", "forward_passes"}


def test_checks_are_the_report_s(runs):
    run = runs["api"]
    assert all(isinstance(w, str) and "\n" not in w for w in run.checks)
    expected = "".join(f"WARNING: {w}\n" for w in run.checks) or "all sanity checks passed\n"
    assert (run.folder / "checks.txt").read_text() == expected


def test_a_dict_profile_reuses_the_toml_profile_s_cells(runs, capsys):
    api = runs["api"]
    again = pixeldp_bench.run(TINY, results=api.results, seed=0, device="cpu")
    out = capsys.readouterr().out
    assert again.run_id.startswith("profile-") and "0 cell(s) computed, 2 reused from the store" in out
    pd.testing.assert_frame_equal(again.records, api.records)  # the very records: timings too
    quiet = pixeldp_bench.run(TINY, results=api.results, seed=0, device="cpu", quiet=True)
    assert capsys.readouterr() == ("", "") and quiet.run_id != again.run_id


@pytest.mark.parametrize("profile, message", [
    ({"run": {"examples": 0}, **{k: v for k, v in TINY.items() if k != "run"}}, "run.examples must be a whole number"),
    ({**TINY, "defenses": {"undefended": {"parms": {}}}}, "unknown key 'parms' in [defenses.undefended]"),
    ({**TINY, "run": {"seed": None}}, "profile dict: run.seed is a NoneType"),
    ({**TINY, "extra": {}}, "unknown key 'extra' in the profile's top level"),
])
def test_a_malformed_dict_is_one_config_error_line(profile, message, tmp_path):
    with pytest.raises(ConfigError) as caught:
        pixeldp_bench.run(profile, results=tmp_path / "results", quiet=True)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "results").exists()  # refused before anything is written


def test_load_run_reopens_a_run_read_only(runs, tmp_path):
    api = runs["api"]
    for again in (load_run(api.results, api.run_id), load_run(api.folder)):
        assert again.run_id == api.run_id and again.store.readonly
        for name in again.tables:
            pd.testing.assert_frame_equal(again.tables[name], api.tables[name])
        again.close()
    assert load_run(runs["cli"].results).run_id == runs["cli"].run_id  # the latest run
    paths = load_run(api.folder).write_report(tmp_path)
    for name in ("accuracy_under_attack.csv", "checks.txt"):
        assert (tmp_path / name).read_text() == (api.folder / name).read_text()
    assert paths["accuracy_under_attack"]["csv"] == tmp_path / "accuracy_under_attack.csv"


def test_compare_with_itself_finds_no_regression(runs):
    for other in (runs["api"], runs["cli"], str(runs["cli"].folder)):
        frame, regressions = runs["api"].compare(other)
        assert regressions == [] and len(frame) == 3 and (frame["delta"] == 0).all()


def test_importing_the_package_loads_no_torch():
    code = "import sys, pixeldp_bench; assert 'torch' not in sys.modules; assert pixeldp_bench.UserError"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
