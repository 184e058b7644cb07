"""Reading a baseline export (bench.reporting.baseline.load_export): a bad file is one StoreError line."""
from __future__ import annotations

import json

import pytest
from synthetic_runs import fill_store

from bench.reporting.baseline import export_run, load_export
from bench.cli.commands import main
from bench.execution.store import Store, StoreError


@pytest.fixture
def export(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    return export_run(store, fill_store(store), tmp_path / "baseline.json")


def test_damaged_exports_raise_store_errors(export, tmp_path):
    payload = json.loads(export.read_text())
    column = payload["cells"][0]["records"]["label"]
    column.append(column[0])  # one record column longer than the others
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(payload))
    with pytest.raises(StoreError, match="damaged.*ValueError"):
        load_export(damaged)
    (tmp_path / "truncated.json").write_text(export.read_text()[:100])
    with pytest.raises(StoreError, match="cannot read run export.*JSONDecodeError"):
        load_export(tmp_path / "truncated.json")
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(StoreError, match="not a pixeldp-bench run export"):
        load_export(tmp_path / "other.json")


def test_compare_against_a_bad_export_is_one_line(export, tmp_path, capsys):
    (tmp_path / "other.json").write_text("[1, 2]")
    assert main(["compare", str(tmp_path / "other.json"), str(export)]) == 2
    err = capsys.readouterr().err
    assert "is not a pixeldp-bench run export" in err and err.count("\n") == 1
