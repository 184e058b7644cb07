"""SQLite results store (WAL): cells, per-example records and runs; one transaction per finished cell."""
from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.types import Cell, Record

__all__ = ["ClaimOwner", "Store", "StoreError"]

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
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, heartbeat REAL NOT NULL);
"""
# A claim whose owner has not refreshed it for this long is taken over (owners on other hosts,
# whose process table this host cannot see); a dead owner on this host is detected at once.
STALE_CLAIM_SECONDS = 600.0


class StoreError(RuntimeError):
    """The results store cannot be read or written; the message says which file and what to do."""


def _encode_norm(value: float) -> float:
    # SQLite stores inf fine, but NaN becomes NULL; refuse it instead of losing it silently.
    if math.isnan(value):
        raise ValueError("a record's norm is NaN")
    return value


@dataclass(frozen=True)
class ClaimOwner:
    """Who computes a cell or trains a model: a unique id plus the host and pid used to detect its death."""

    owner: str
    host: str
    pid: int

    @classmethod
    def this_process(cls) -> ClaimOwner:
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid())

    def alive(self, heartbeat: float) -> bool:
        """False when the owner is known dead (a gone pid on this host) or silent for too long."""
        if self.host == socket.gethostname():
            return _pid_alive(self.pid)
        return time.time() - heartbeat < STALE_CLAIM_SECONDS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _disk_message(path: Path, exc: BaseException) -> str:
    return (f"cannot write to the results store {path} ({exc}); free disk space (or fix permissions) and "
            "re-run the same command: finished cells are kept and the run resumes")


class Store:
    """Results of every cell ever run under one results folder, keyed by cell key.

    Several processes may share one store: SQLite's locking (busy timeout, BEGIN IMMEDIATE)
    serialises writers, a cell is claimed before it is computed, and inserts are idempotent.
    `readonly=True` opens without writing anything (report and compare on a read-only folder).
    """

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        memory = str(path) == ":memory:"
        if not memory and readonly and not self.path.is_file():
            raise StoreError(f"no results store at {self.path}; pass --results DIR or a run folder")
        if not memory and self.path.exists() and not self.path.is_file():
            raise StoreError(f"results store {self.path} is not a file; pass --results to a results folder")
        try:
            if not readonly and not memory:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = self._connect(memory)
            if not readonly:
                self.conn.executescript(SCHEMA)
            self._check_version()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"results store {self.path} is unreadable ({exc}); move it aside or pass "
                             "--results to another folder (nothing was written to it)") from exc
        except OSError as exc:
            raise StoreError(f"cannot create the results folder {self.path.parent} ({exc}); pass --results to a "
                             "writable folder") from exc

    def _connect(self, memory: bool) -> sqlite3.Connection:
        if memory:
            return sqlite3.connect(":memory:", isolation_level=None)
        if self.readonly:
            # mode=ro reads a WAL database that others may be writing; immutable=1 is the fallback for a
            # folder where even SQLite's shared-memory file cannot be created.
            uri = self.path.resolve().as_uri()
            try:
                conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60, isolation_level=None)
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.OperationalError:
                return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=60000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _check_version(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None and not self.readonly:
            self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row is not None and int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"results store {self.path} has schema {row[0]}, this version reads {SCHEMA_VERSION}; "
                             "use a fresh --results folder")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; a full disk is a StoreError."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                if self.conn.in_transaction:  # SQLite may already have rolled back (e.g. on a full disk)
                    self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if "full" in str(exc) or "readonly" in str(exc) or "disk" in str(exc):
                raise StoreError(_disk_message(self.path, exc)) from exc
            raise

    def is_done(self, key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM cells WHERE key=?", (key,)).fetchone() is not None

    def claim(self, key: str, me: ClaimOwner) -> str:
        """Try to take `key` for `me`: "done" (already stored), "mine" (compute it now) or "busy"
        (a live process is computing it: wait and reuse its result)."""
        with self.transaction() as conn:
            if key.startswith("cell:") and conn.execute("SELECT 1 FROM cells WHERE key=?", (key[5:],)).fetchone():
                return "done"
            row = conn.execute("SELECT owner, host, pid, heartbeat FROM claims WHERE key=?", (key,)).fetchone()
            if row is not None and row[0] != me.owner and ClaimOwner(row[0], row[1], row[2]).alive(row[3]):
                return "busy"
            conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                         (key, me.owner, me.host, me.pid, time.time()))
            return "mine"

    def claim_holder(self, key: str) -> str:
        """'pid N on HOST' of a claim's owner, for messages."""
        row = self.conn.execute("SELECT host, pid FROM claims WHERE key=?", (key,)).fetchone()
        return "another process" if row is None else f"pid {row[1]} on {row[0]}"

    def release(self, key: str, me: ClaimOwner) -> None:
        """Drop `me`'s claim on `key` (e.g. after a failure, so another process may take it)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM claims WHERE key=? AND owner=?", (key, me.owner))

    def heartbeat(self, me: ClaimOwner) -> None:
        """Refresh every claim `me` holds (owners on other hosts are judged by this time)."""
        with self.transaction() as conn:
            conn.execute("UPDATE claims SET heartbeat=? WHERE owner=?", (time.time(), me.owner))

    def write_cell(self, key: str, cell: Cell, records: list[Record], info: dict[str, Any],
                   me: ClaimOwner | None = None) -> bool:
        """Store a finished cell and all its records atomically (all or nothing); False when another
        process stored it first (the insert is idempotent). Releases `me`'s claim in the same transaction."""
        rows = [(key, r.index, r.label, r.clean_pred, r.adv_pred, _encode_norm(r.norm), r.radius, r.seconds,
                 r.forward_passes) for r in records]
        with self.transaction() as conn:
            inserted = conn.execute("INSERT OR IGNORE INTO cells VALUES (?, ?, ?, ?)",
                                    (key, json.dumps(cell.config(), sort_keys=True), json.dumps(info, sort_keys=True),
                                     time.time())).rowcount == 1
            if inserted:
                conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            if me is not None:
                conn.execute("DELETE FROM claims WHERE key=? AND owner=?", ("cell:" + key, me.owner))
        return inserted

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

    def missing_cells(self, run_id: str) -> list[tuple[str, Cell]]:
        """The run's cells that have no stored result (a killed or failed run is incomplete)."""
        return [(key, cell) for key, cell in self.run_cells(run_id) if not self.is_done(key)]

    def all_cells(self) -> list[tuple[str, Cell, dict[str, Any]]]:
        """(key, cell, info) of every stored cell, oldest first (explains recomputation in --dry-run)."""
        rows = self.conn.execute("SELECT key, config, info FROM cells ORDER BY finished")
        return [(key, Cell(**json.loads(config)), json.loads(info)) for key, config, info in rows]

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
