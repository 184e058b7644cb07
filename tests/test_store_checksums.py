"""Checksums of cells and runs, the schema-1 migration, SQLite errors as one-line StoreErrors, check and recover."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bench.cli.commands import main
from bench.execution.store import ClaimOwner, DamagedCellError, Store, StoreError
from bench.cli.store_tools import check_store, recover_store
from synthetic_runs import fill_store


@pytest.fixture
def store_path(tmp_path) -> Path:
    path = tmp_path / "results" / "store.sqlite"
    store = Store(path)
    fill_store(store)
    store.close()
    return path


def raw(path: Path, *statements: str) -> list:
    """Run SQL on the store behind the Store's back (as damage would); the last statement's rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        rows: list = []
        for sql in statements:
            rows = conn.execute(sql).fetchall()
        return rows
    finally:
        conn.close()


def first_key(path: Path, attack: str = "pgd") -> str:
    return raw(path, f"SELECT key FROM cells WHERE config LIKE '%\"attack\": \"{attack}\"%' ORDER BY key LIMIT 1")[0][0]


def test_every_cell_and_run_carries_a_checksum_and_checks_healthy(store_path):
    sums = raw(store_path, "SELECT checksum FROM cells UNION ALL SELECT checksum FROM runs")
    assert sums and all(isinstance(s, str) and len(s) == 64 for (s,) in sums)
    problems, counts = check_store(store_path)
    assert problems == [] and counts["cells"] == len(sums) - 1 and counts["runs"] == 1
    assert raw(store_path, "SELECT value FROM meta WHERE key='schema'") == [("2",)]


@pytest.mark.parametrize("damage", [
    "UPDATE records SET label = label + 1 WHERE cell_key = '{key}' AND idx = 1",
    "UPDATE records SET norm = CAST(CAST(norm AS TEXT) AS BLOB) WHERE cell_key = '{key}' AND idx = 1",  # other type
    "DELETE FROM records WHERE cell_key = '{key}' AND idx = 1",
    "UPDATE cells SET info = replace(info, '100', '101') WHERE key = '{key}'",
])
def test_a_changed_value_is_a_damaged_cell_never_reused(store_path, damage, capsys):
    key = first_key(store_path)
    raw(store_path, damage.format(key=key))
    reader = Store(store_path, readonly=True)
    with pytest.raises(DamagedCellError, match=f"cell mnist5k/.* \\(key {key}\\) .* is damaged"):
        reader.records(key)
    reader.close()
    assert any(key in line for line in check_store(store_path)[0])
    warnings: list[str] = []
    writer = Store(store_path, warn=warnings.append)
    assert writer.claim("cell:" + key, ClaimOwner.this_process()) == "mine"  # deleted, to be computed again
    assert len(warnings) == 1 and key in warnings[0] and warnings[0].startswith("pixeldp-bench: warning: cell mnist5k")
    assert not writer.is_done(key) and writer.count_records(key) == 0


def test_report_of_a_damaged_cell_is_one_line_naming_it(store_path, capsys):
    key = first_key(store_path)
    raw(store_path, f"UPDATE records SET adv_pred = adv_pred + 1 WHERE cell_key = '{key}' AND idx = 4")
    assert main(["report", "synthetic-run", "--results", str(store_path.parent)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"(key {key})" in err and "re-run its profile" in err


def test_a_damaged_run_list_is_one_line(store_path, capsys):
    raw(store_path, "UPDATE run_cells SET config = replace(config, '\"eps\": 0.1', '\"eps\": 0.2') WHERE position = 1")
    assert main(["report", "synthetic-run", "--results", str(store_path.parent)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run synthetic-run" in err and "checksum" in err


def _schema_1(path: Path, *damage: str) -> None:
    """Turn a store into one written before checksums existed (schema 1), plus `damage`."""
    raw(path, "ALTER TABLE cells DROP COLUMN checksum", "ALTER TABLE runs DROP COLUMN checksum",
        "UPDATE meta SET value = '1' WHERE key = 'schema'", *damage)


def test_a_schema_1_store_is_read_as_is_and_sealed_on_its_first_writable_open(store_path):
    damaged = first_key(store_path, "cw_l2")
    _schema_1(store_path, f"DELETE FROM records WHERE cell_key = '{damaged}' AND idx = 1")
    cells = raw(store_path, "SELECT COUNT(*) FROM cells")[0][0]
    reader = Store(store_path, readonly=True)  # read-only: nothing is written, cells are checked by count and type
    assert reader.records(first_key(store_path))
    with pytest.raises(DamagedCellError, match="19 records for 20 examples"):
        reader.records(damaged)
    reader.close()
    assert raw(store_path, "SELECT value FROM meta WHERE key='schema'") == [("1",)]

    notes: list[str] = []
    writer = Store(store_path, warn=notes.append)
    assert notes == [f"pixeldp-bench: note: {store_path} was written by an older version: checksums added to its "
                     f"{cells - 1} cell(s) and 1 run(s) as they are now (they detect damage from now on)"]
    assert raw(store_path, "SELECT value FROM meta WHERE key='schema'") == [("2",)]
    assert raw(store_path, f"SELECT checksum FROM cells WHERE key = '{damaged}'") == [(None,)]  # not sealed
    me = ClaimOwner.this_process()
    assert writer.claim("cell:" + first_key(store_path), me) == "done"
    assert writer.claim("cell:" + damaged, me) == "mine" and "19 records for 20 examples" in notes[-1]
    writer.close()
    assert Store(store_path, warn=notes.append) and len(notes) == 2  # migrated once


class FailingConnection:
    """An sqlite3 connection whose statements containing `match` raise `error` (damage seen mid-transaction)."""

    def __init__(self, conn: sqlite3.Connection, match: str, error: Exception):
        self.conn, self.match, self.error = conn, match, error

    def execute(self, sql: str, *args):
        if self.match in sql:
            raise self.error
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


@pytest.mark.parametrize("match, error, message", [
    ("INSERT OR IGNORE INTO cells", sqlite3.DatabaseError("database disk image is malformed"), "is damaged"),
    ("SELECT key, config, info", sqlite3.DatabaseError("database disk image is malformed"), "store recover"),
    ("INSERT OR IGNORE INTO cells", sqlite3.OperationalError("database or disk is full"), "free disk space"),
    ("SELECT key, config, info", sqlite3.OperationalError("database is locked"), "stayed locked"),
    ("SELECT key, config, info", UnicodeDecodeError("utf-8", b"\xad", 0, 1, "invalid start byte"), "is damaged"),
])
def test_sqlite_errors_in_and_out_of_transactions_are_store_errors(store_path, match, error, message):
    from synthetic_runs import synthetic_run

    cell, records, info = synthetic_run()[0]
    store = Store(store_path)
    store.conn = FailingConnection(store.conn, match, error)  # type: ignore[assignment]
    with pytest.raises(StoreError, match=message) as caught:
        store.write_cell("new-key", cell, records, info)
    assert "\n" not in str(caught.value) and str(store_path) in str(caught.value)
    assert not store.conn.in_transaction  # rolled back


def test_a_bug_keeps_its_traceback(store_path):
    store = Store(store_path)
    failing = FailingConnection(store.conn, "SELECT 1 FROM cells", sqlite3.ProgrammingError("bad binding"))
    store.conn = failing  # type: ignore[assignment]
    with pytest.raises(sqlite3.ProgrammingError):
        store.is_done("x")


def test_recover_copies_the_intact_cells_and_moves_the_damaged_store_aside(store_path, capsys):
    cells = raw(store_path, "SELECT COUNT(*) FROM cells")[0][0]
    key = first_key(store_path)
    raw(store_path, f"UPDATE records SET label = label + 1 WHERE cell_key = '{key}' AND idx = 1")
    before = store_path.read_bytes()
    result = recover_store(store_path)
    assert (result["saved"], result["lost"], result["runs_saved"], result["runs_lost"]) == (cells - 1, 1, 1, 0)
    assert result["damaged"].read_bytes() == before
    out = capsys.readouterr().out
    assert "lost cell mnist5k/" in out and key in out and "only the lost cells are computed again" in out
    assert check_store(store_path)[0] == []
    store = Store(store_path, readonly=True)
    assert not store.is_done(key) and store.missing_cells("synthetic-run") == [
        (key, c) for k, c in store.run_cells("synthetic-run") if k == key]
    assert store.run_info("synthetic-run")["profile"] == "synthetic"


def test_recover_refuses_while_a_run_writes_into_the_store(store_path):
    store = Store(store_path)
    store.claim("cell:abc", ClaimOwner.this_process())  # this live process holds a claim
    store.close()
    with pytest.raises(StoreError, match="is being written by pid"):
        recover_store(store_path)


def test_store_commands_on_a_missing_or_healthy_store(store_path, tmp_path, capsys):
    assert main(["store", "check", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no results store" in err
    assert main(["store", "check", "--results", str(store_path.parent)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("healthy: ")
