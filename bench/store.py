"""SQLite results store (WAL): cells, per-example records and runs; one transaction per finished cell."""
from __future__ import annotations

import json
import math
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from bench.types import Cell, Record

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY, config TEXT NOT NULL, info TEXT NOT NULL, finished REAL NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    cell_key TEXT NOT NULL REFERENCES cells(key), idx INTEGER NOT NULL, label INTEGER NOT NULL,
    clean_pred INTEGER NOT NULL, adv_pred INTEGER NOT NULL, norm REAL NOT NULL, radius REAL,
    seconds REAL NOT NULL, forward_passes INTEGER NOT NULL, PRIMARY KEY (cell_key, idx));
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, profile TEXT NOT NULL, settings TEXT NOT NULL, environment TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS run_cells (
    run_id TEXT NOT NULL REFERENCES runs(run_id), position INTEGER NOT NULL, cell_key TEXT NOT NULL,
    config TEXT NOT NULL, PRIMARY KEY (run_id, position));
"""


class StoreError(RuntimeError):
    """The results store cannot be read or written; the message says which file and what to do."""


def _encode_norm(value: float) -> float:
    # SQLite stores inf fine, but NaN becomes NULL; refuse it instead of losing it silently.
    if math.isnan(value):
        raise ValueError("a record's norm is NaN")
    return value


class Store:
    """Results of every cell ever run under one results folder, keyed by cell key."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(SCHEMA)
            self._check_version()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"results store {self.path} is unreadable ({exc}); move it aside or pass "
                             "--results to another folder (nothing was written to it)") from exc

    def _check_version(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self.conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"results store {self.path} has schema {row[0]}, this version reads {SCHEMA_VERSION}; "
                             "use a fresh --results folder")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def is_done(self, key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM cells WHERE key=?", (key,)).fetchone() is not None

    def write_cell(self, key: str, cell: Cell, records: list[Record], info: dict[str, Any]) -> None:
        """Store a finished cell and all its records atomically (all or nothing)."""
        rows = [(key, r.index, r.label, r.clean_pred, r.adv_pred, _encode_norm(r.norm), r.radius, r.seconds,
                 r.forward_passes) for r in records]
        with self.transaction() as conn:
            conn.execute("INSERT INTO cells VALUES (?, ?, ?, ?)",
                         (key, json.dumps(cell.config(), sort_keys=True), json.dumps(info, sort_keys=True), time.time()))
            conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def start_run(self, run_id: str, profile: str, settings: dict[str, Any], environment: dict[str, Any],
                  cells: list[tuple[str, Cell]]) -> None:
        """Register a run and the ordered list of its cell keys."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                         (run_id, profile, json.dumps(settings, sort_keys=True),
                          json.dumps(environment, sort_keys=True), time.time()))
            conn.executemany("INSERT INTO run_cells VALUES (?, ?, ?, ?)",
                             [(run_id, i, key, json.dumps(cell.config(), sort_keys=True))
                              for i, (key, cell) in enumerate(cells)])

    def runs(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT run_id FROM runs ORDER BY created")]

    def run_info(self, run_id: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT profile, settings, environment, created FROM runs WHERE run_id=?",
                                (run_id,)).fetchone()
        if row is None:
            known = ", ".join(self.runs()[-10:]) or "(none)"
            raise StoreError(f"no run {run_id!r} in {self.path}; recent runs: {known}")
        return {"run_id": run_id, "profile": row[0], "settings": json.loads(row[1]),
                "environment": json.loads(row[2]), "created": row[3]}

    def run_cells(self, run_id: str) -> list[tuple[str, Cell]]:
        rows = self.conn.execute("SELECT cell_key, config FROM run_cells WHERE run_id=? ORDER BY position", (run_id,))
        return [(key, Cell(**json.loads(config))) for key, config in rows]

    def cell_info(self, key: str) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT info FROM cells WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def records(self, key: str) -> list[Record]:
        rows = self.conn.execute("SELECT idx, label, clean_pred, adv_pred, norm, radius, seconds, forward_passes "
                                 "FROM records WHERE cell_key=? ORDER BY idx", (key,))
        return [Record(*row) for row in rows]

    def count_records(self, key: str) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM records WHERE cell_key=?", (key,)).fetchone()[0]
