"""SQLite results store (WAL): cells, per-example records and runs; one transaction per finished cell.

Every cell and run carries a SHA-256 checksum (bench.execution.checksums) checked whenever it is read; a
damaged file or row is a StoreError naming the file and the fix, never a traceback.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from bench.execution.checksums import RECORD_COLUMNS, cell_checksum, run_checksum
from bench.core.errors import UserError
from bench.core.types import Cell, Record, cell_label

__all__ = ["ClaimOwner", "DamagedCellError", "STORE_NAME", "Store", "StoreError", "claim_rounds"]

STORE_NAME = "store.sqlite"  # a results folder's store: every command finds it under this name

# 2: cells and runs carry a checksum column. A schema-1 store is read as is (its cells unverified
# beyond their record counts) and migrated on its first writable open (`Store._migrate`).
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    key TEXT PRIMARY KEY, config TEXT NOT NULL, info TEXT NOT NULL, finished REAL NOT NULL, checksum TEXT);
CREATE TABLE IF NOT EXISTS records (
    cell_key TEXT NOT NULL REFERENCES cells(key), idx INTEGER NOT NULL, label INTEGER NOT NULL,
    clean_pred INTEGER NOT NULL, adv_pred INTEGER NOT NULL, norm REAL NOT NULL, radius REAL,
    seconds REAL NOT NULL, forward_passes INTEGER NOT NULL, PRIMARY KEY (cell_key, idx));
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, profile TEXT NOT NULL, settings TEXT NOT NULL, environment TEXT NOT NULL,
    created REAL NOT NULL, checksum TEXT);
CREATE TABLE IF NOT EXISTS run_cells (
    run_id TEXT NOT NULL REFERENCES runs(run_id), position INTEGER NOT NULL, cell_key TEXT NOT NULL,
    config TEXT NOT NULL, PRIMARY KEY (run_id, position));
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY, owner TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, heartbeat REAL NOT NULL);
"""
# A claim whose owner has not refreshed it for this long is taken over (owners on other hosts,
# whose process table this host cannot see); a dead owner on this host is detected at once.
STALE_CLAIM_SECONDS = 600.0
RUN_COLUMNS = "run_id, profile, settings, environment, created"  # what a run checksum covers, with run_cells
T = TypeVar("T")
# Python's sqlite3 raises UnicodeDecodeError, not an SQLite error, when a message or schema text it decodes is damaged.
SQLITE_ERRORS = (sqlite3.DatabaseError, UnicodeDecodeError)


class StoreError(UserError, RuntimeError):
    """The results store cannot be read or written; the message says which file and what to do."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message  # the SQLite error alone, for listings (`store check`)


class DamagedCellError(StoreError):
    """A stored cell's records, config or info no longer match its checksum (or its record count)."""


def _one_line(text: Any, limit: int = 160) -> str:
    """Stored or SQLite text made safe for a one-line message: printable, no newlines, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."


def describe_config(key: str, config: Any) -> str:
    """'dataset/defense/attack@eps (key K)' from a stored config text, or just the key when it is unreadable."""
    try:
        c = json.loads(config)
        what = cell_label(c["dataset"], c.get("defense_label") or c["defense"], c.get("attack_label") or c["attack"],
                          c.get("eps"))
    except (ValueError, TypeError, KeyError, AttributeError):
        return f"key {_one_line(key)}"
    return _one_line(f"{what} (key {key})")


def _legacy_problem(config: Any, info: Any, rows: list[tuple]) -> str | None:
    """What is wrong with a cell stored before checksums, as far as its own values tell (None: nothing seen)."""
    try:
        json.loads(info)
        examples = json.loads(config)["examples"]
    except (ValueError, TypeError, KeyError) as exc:
        return f"unreadable config or info ({_one_line(exc, 60)})"
    ints, floats = (0, 1, 2, 3, 7), (4, 6)
    for row in rows:
        if (not all(type(row[i]) is int for i in ints) or not all(type(row[i]) is float for i in floats)
                or not (row[5] is None or type(row[5]) is float)):
            return f"record {_one_line(row[0], 20)} holds values of the wrong type"
    return None if len(rows) == examples else f"{len(rows)} records for {examples} examples"


def _stored_cell(key: str, config: str, info: str) -> tuple[str, Cell, dict[str, Any]]:
    return key, Cell(**json.loads(config)), json.loads(info)


def _listed_cell(key: str, config: str) -> tuple[str, Cell]:
    return key, Cell(**json.loads(config))


def _is_damage(text: str) -> bool:
    return any(word in text for word in ("malformed", "not a database", "Could not decode", "corrupt"))


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
    Every SQLite error that is not a bug of this module, and every stored value that cannot be
    decoded or fails its checksum, is raised as a StoreError (DamagedCellError for one cell).
    """

    def __init__(self, path: Path, readonly: bool = False, warn: Callable[[str], None] | None = None,
                 salvage: bool = False):
        """`salvage` (read-only, for `store recover`): open whatever the schema row says, which damage may have hit."""
        self.path = Path(path)
        self.readonly = readonly = readonly or salvage
        # One-line notes and warnings (a damaged cell deleted for recomputation, a migration).
        self.warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        self._verified: set[str] = set()  # cells and runs ("run:" + id) checked in this connection
        self._cell_sum = self._run_sum = "checksum"
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
            if not salvage:
                self._check_version()
            columns = {table: {r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")}
                       for table in ("cells", "runs")}
            self._cell_sum = "checksum" if "checksum" in columns["cells"] else "NULL"
            self._run_sum = "checksum" if "checksum" in columns["runs"] else "NULL"
        except SQLITE_ERRORS as exc:
            raise StoreError(f"results store {self.path} is unreadable or damaged ({_one_line(exc, 100)}); run "
                             f"`pixeldp-bench store recover --results {self.path.parent}` to save its intact cells, "
                             "or move it aside (nothing was written to it)") from exc
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
            row = (str(SCHEMA_VERSION),)
        version = self._decode("its schema version", lambda: int(row[0])) if row is not None else SCHEMA_VERSION
        if version not in READABLE_SCHEMAS:
            raise StoreError(f"results store {self.path} has schema {_one_line(version)}, this version reads "
                             f"{', '.join(map(str, READABLE_SCHEMAS))}; use a fresh --results folder")
        if version < SCHEMA_VERSION and not self.readonly:
            self._migrate()

    def _migrate(self) -> None:
        """Schema 1 -> 2: add the checksum columns and seal the cells and runs stored so far.

        Old cells are sealed as they are now, so their checksums catch later damage, not earlier
        damage; a cell whose own values already look wrong (record count, types) is left unsealed,
        and `claim` recomputes it.
        """
        with self.transaction() as conn:
            for table in ("cells", "runs"):
                if "checksum" not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN checksum TEXT")
            sealed = 0
            for (key,) in self._all("SELECT key FROM cells WHERE checksum IS NULL"):
                head, rows = self._read_cell(key)
                if head is not None and _legacy_problem(head[1], head[2], rows) is None:
                    conn.execute("UPDATE cells SET checksum=? WHERE key=?",
                                 (cell_checksum(key, head[1], head[2], rows), key))
                    sealed += 1
            runs = [run_id for (run_id,) in self._all("SELECT run_id FROM runs WHERE checksum IS NULL")]
            for run_id in runs:
                conn.execute("UPDATE runs SET checksum=? WHERE run_id=?", (self._stored_run_checksum(run_id), run_id))
            conn.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
        if sealed or runs:
            self.warn(f"pixeldp-bench: note: {self.path} was written by an older version: checksums added to its "
                      f"{sealed} cell(s) and {len(runs)} run(s) as they are now (they detect damage from now on)")

    def close(self) -> None:
        self.conn.close()

    def _fail(self, exc: sqlite3.DatabaseError | UnicodeDecodeError) -> NoReturn:
        """Raise the StoreError an SQLite error means (a damaged file, a full disk, a lock); a bug stays itself."""
        text = _one_line(exc, 100)
        if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError) or "syntax error" in text:
            raise exc
        if not _is_damage(text) and any(word in text for word in ("full", "readonly", "disk")):
            raise StoreError(_disk_message(self.path, exc)) from exc
        if not _is_damage(text) and ("locked" in text or "busy" in text):
            raise StoreError(f"results store {self.path} stayed locked by another process ({text}); wait for it to "
                             "finish and re-run, or pass --results to another folder") from exc
        raise StoreError(self._damage_message(text), text) from exc

    def _damage_message(self, detail: str) -> str:
        return (f"results store {self.path} is damaged ({detail}); run `pixeldp-bench store recover --results "
                f"{self.path.parent}` to copy the intact cells into a new store, or move it aside")

    def _all(self, sql: str, params: tuple = ()) -> list[Any]:
        """Every row of a query; SQLite errors become StoreErrors (every read goes through here or `_one`)."""
        try:
            return self.conn.execute(sql, params).fetchall()
        except SQLITE_ERRORS as exc:
            self._fail(exc)

    def _one(self, sql: str, params: tuple = ()) -> Any:
        try:
            return self.conn.execute(sql, params).fetchone()
        except SQLITE_ERRORS as exc:
            self._fail(exc)

    def _decode(self, what: str, decode: Callable[..., T], *values: Any) -> T:
        """decode(*values) of stored values (JSON, a Cell); what damage made undecodable is a StoreError naming it."""
        try:
            return decode(*values)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            raise StoreError(self._damage_message(f"{what} cannot be decoded: {_one_line(exc, 80)}")) from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error; SQLite errors become StoreErrors (`_fail`)."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                if self.conn.in_transaction:  # SQLite may already have rolled back (e.g. on a full disk)
                    self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        except SQLITE_ERRORS as exc:
            if self.conn.in_transaction:
                with suppress(*SQLITE_ERRORS):  # the error being reported is the one that matters
                    self.conn.execute("ROLLBACK")
            self._fail(exc)

    def is_done(self, key: str) -> bool:
        return self._one("SELECT 1 FROM cells WHERE key=?", (key,)) is not None

    def _read_cell(self, key: str, scan: bool = False) -> tuple[Any, list[tuple]]:
        """(key, config, info, checksum, finished) row or None, and the record rows (RECORD_COLUMNS) of a cell.

        `scan` reads the tables without their indexes (recovery, when an index is what is damaged).
        """
        hint = " NOT INDEXED" if scan else ""
        head = self._one(f"SELECT key, config, info, {self._cell_sum}, finished FROM cells{hint} WHERE key=?", (key,))
        rows = self._all(f"SELECT {RECORD_COLUMNS} FROM records{hint} WHERE cell_key=? ORDER BY idx", (key,))
        return head, rows

    def _problem(self, key: str, head: Any, rows: list[tuple]) -> str | None:
        """Why a cell read by `_read_cell` cannot be trusted; None when it is intact or not stored at all."""
        if head is None:
            # write_cell stores a cell row and its records together: records alone are left by damage.
            return f"{len(rows)} records without their cell row" if rows else None
        config, info, checksum = head[1:4]
        if head[0] != key:  # found through the index, but the row itself names another key
            return f"its row names key {_one_line(head[0], 40)}"
        if checksum is None:
            return _legacy_problem(config, info, rows)
        if cell_checksum(key, config, info, rows) != checksum:
            return "its records, config or info do not match their checksum"
        examples = json.loads(config).get("examples")  # verified by the checksum: decodes
        return None if len(rows) == examples else f"{len(rows)} records for {examples} examples"

    def cell_problem(self, key: str, scan: bool = False) -> str | None:
        """Why the stored cell `key` cannot be trusted (checksum, record count), or None when it is intact."""
        return self._problem(key, *self._read_cell(key, scan))

    def _damaged_cell(self, key: str, head: Any, problem: str) -> DamagedCellError:
        return DamagedCellError(
            f"cell {describe_config(key, None if head is None else head[1])} in results store {self.path} is damaged "
            f"({problem}); re-run its profile into {self.path.parent} to recompute it (see `pixeldp-bench store check "
            f"--results {self.path.parent}`)")

    def _discard(self, conn: sqlite3.Connection, key: str) -> None:
        """Delete a cell and its records (inside a transaction): it will be computed again."""
        conn.execute("DELETE FROM records WHERE cell_key=?", (key,))
        conn.execute("DELETE FROM cells WHERE key=?", (key,))
        self._verified.discard(key)

    def claim(self, key: str, me: ClaimOwner) -> str:
        """Try to take `key` for `me`: "done" (already stored), "mine" (compute it now) or "busy"
        (a live process is computing it: wait and reuse its result).

        A stored cell is reused only when it passes its checksum: a damaged one is deleted, with a
        one-line warning naming it, and claimed for recomputation.
        """
        with self.transaction() as conn:
            if key.startswith("cell:") and self.is_done(key[5:]):
                if key[5:] in self._verified:
                    return "done"
                head, rows = self._read_cell(key[5:])
                problem = self._problem(key[5:], head, rows)
                if problem is None:
                    self._verified.add(key[5:])
                    return "done"
                self._discard(conn, key[5:])
                self.warn(f"pixeldp-bench: warning: cell {describe_config(key[5:], head[1])} in {self.path} was "
                          f"damaged ({problem}); it was deleted and is recomputed")
            row = self._one("SELECT owner, host, pid, heartbeat FROM claims WHERE key=?", (key,))
            if row is not None and row[0] != me.owner and self._decode(
                    "a claim", lambda: ClaimOwner(row[0], row[1], int(row[2])).alive(float(row[3]))):
                return "busy"
            conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                         (key, me.owner, me.host, me.pid, time.time()))
            return "mine"

    def claim_holder(self, key: str) -> str:
        """'pid N on HOST' of a claim's owner, for messages."""
        row = self._one("SELECT host, pid FROM claims WHERE key=?", (key,))
        return "another process" if row is None else _one_line(f"pid {row[1]} on {row[0]}")

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
            inserted = conn.execute("INSERT OR IGNORE INTO cells (key, config, info, finished) VALUES (?, ?, ?, ?)",
                                    (key, json.dumps(cell.config(), sort_keys=True), json.dumps(info, sort_keys=True),
                                     time.time())).rowcount == 1
            if inserted:
                # Records without their cell row can only be left by damage: they give way to the new ones.
                conn.execute("DELETE FROM records WHERE cell_key=?", (key,))
                conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._seal_cell(conn, key)
            if me is not None:
                conn.execute("DELETE FROM claims WHERE key=? AND owner=?", ("cell:" + key, me.owner))
        return inserted

    def start_run(self, run_id: str, profile: str, settings: dict[str, Any], environment: dict[str, Any],
                  cells: list[tuple[str, Cell]]) -> None:
        """Register a run and the ordered list of its cell keys."""
        with self.transaction() as conn:
            conn.execute(f"INSERT INTO runs ({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                         (run_id, profile, json.dumps(settings, sort_keys=True),
                          json.dumps(environment, sort_keys=True), time.time()))
            conn.executemany("INSERT INTO run_cells VALUES (?, ?, ?, ?)",
                             [(run_id, i, key, json.dumps(cell.config(), sort_keys=True))
                              for i, (key, cell) in enumerate(cells)])
            conn.execute("UPDATE runs SET checksum=? WHERE run_id=?", (self._stored_run_checksum(run_id), run_id))

    def _seal_cell(self, conn: sqlite3.Connection, key: str) -> None:
        """Set a cell's checksum from its rows as stored (read back inside the writing transaction)."""
        head, rows = self._read_cell(key)
        if head is None:  # what was just written cannot be found again: a damaged index
            raise StoreError(self._damage_message(f"cell {key}, just written, cannot be read back"))
        conn.execute("UPDATE cells SET checksum=? WHERE key=?", (cell_checksum(key, head[1], head[2], rows), key))

    def _read_run(self, run_id: str, scan: bool = False) -> tuple[Any, list[tuple]]:
        """(RUN_COLUMNS + checksum) row or None, and the (position, cell_key, config) rows of a run, as stored."""
        hint = " NOT INDEXED" if scan else ""
        head = self._one(f"SELECT {RUN_COLUMNS}, {self._run_sum} FROM runs{hint} WHERE run_id=?", (run_id,))
        rows = self._all(f"SELECT position, cell_key, config FROM run_cells{hint} WHERE run_id=? ORDER BY position",
                         (run_id,))
        return head, rows

    def _stored_run_checksum(self, run_id: str) -> str:
        head, rows = self._read_run(run_id)
        if head is None:  # what was just written cannot be found again: a damaged index
            raise StoreError(self._damage_message(f"run {_one_line(run_id)}, just written, cannot be read back"))
        return run_checksum(head[:5], rows)

    def run_problem(self, run_id: str, scan: bool = False) -> str | None:
        """Why a stored run (its settings and cell list) cannot be trusted; None when intact or unknown."""
        return self._run_problem(*self._read_run(run_id, scan))

    @staticmethod
    def _run_problem(head: Any, rows: list[tuple]) -> str | None:
        if head is None:
            return f"{len(rows)} cells listed without their run row" if rows else None
        if not isinstance(head[0], str):
            return "its run id is damaged"
        if head[5] is not None and run_checksum(head[:5], rows) != head[5]:
            return "its settings or cell list do not match their checksum"
        if [r[0] for r in rows] != list(range(len(rows))):
            return "its cell list has gaps"
        return None

    def _checked_run(self, run_id: str) -> tuple[Any, list[tuple]]:
        """A run's rows, verified against its checksum once per connection (a DamagedCellError-like StoreError)."""
        head, rows = self._read_run(run_id)
        if "run:" + run_id not in self._verified:
            problem = self._run_problem(head, rows)
            if problem is not None:
                raise StoreError(f"run {_one_line(run_id)} in results store {self.path} is damaged ({problem}); run "
                                 f"`pixeldp-bench store recover --results {self.path.parent}` to keep its intact "
                                 "cells, then re-run its profile")
            if head is not None:
                self._verified.add("run:" + run_id)
        return head, rows

    def missing_cells(self, run_id: str) -> list[tuple[str, Cell]]:
        """The run's cells that have no stored result (a killed or failed run is incomplete)."""
        return [(key, cell) for key, cell in self.run_cells(run_id) if not self.is_done(key)]

    def all_cells(self) -> list[tuple[str, Cell, dict[str, Any]]]:
        """(key, cell, info) of every stored cell, oldest first (explains recomputation in --dry-run)."""
        rows = self._all("SELECT key, config, info FROM cells ORDER BY finished")
        return [self._decode(f"cell {describe_config(key, config)}", _stored_cell, key, config, info)
                for key, config, info in rows]

    def runs(self) -> list[str]:
        return [r[0] for r in self._all("SELECT run_id FROM runs ORDER BY created")]

    def run_info(self, run_id: str) -> dict[str, Any]:
        row, _ = self._checked_run(run_id)
        if row is None:
            known = ", ".join(map(str, self.runs()[-10:])) or "(none)"
            raise StoreError(f"no run {run_id!r} in {self.path}; recent runs: {_one_line(known, 400)}")
        return self._decode(f"run {_one_line(run_id)}", lambda: {
            "run_id": run_id, "profile": row[1], "settings": json.loads(row[2]), "environment": json.loads(row[3]),
            "created": row[4]})

    def run_cells(self, run_id: str) -> list[tuple[str, Cell]]:
        _, rows = self._checked_run(run_id)
        return [self._decode(f"run {_one_line(run_id)}'s cell {position}", _listed_cell, key, config)
                for position, key, config in rows]

    def cell_info(self, key: str) -> dict[str, Any] | None:
        row = self._one("SELECT config, info FROM cells WHERE key=?", (key,))
        if row is None:
            return None
        if key not in self._verified:
            self.records(key)  # verifies the cell (its info included) once
        return self._decode(f"cell {describe_config(key, row[0])}", lambda: json.loads(row[1]))

    def records(self, key: str) -> list[Record]:
        """The cell's records in index order ([] when not stored); a DamagedCellError when it fails its checksum."""
        head, rows = self._read_cell(key)
        if key not in self._verified:
            problem = self._problem(key, head, rows)
            if problem is not None:
                raise self._damaged_cell(key, head, problem)
            if head is not None:
                self._verified.add(key)
        return [Record(*row) for row in rows]

    def count_records(self, key: str) -> int:
        return self._one("SELECT COUNT(*) FROM records WHERE cell_key=?", (key,))[0]

    # ----------------------------------------------------------------------------- check and recovery
    def _salvage(self, sql: str) -> tuple[list[Any], str | None]:
        """The rows of a query up to the first error (damage may cut a scan short), and that error."""
        rows: list[Any] = []
        try:
            for row in self.conn.execute(sql):
                rows.append(row)
        except SQLITE_ERRORS as exc:
            if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError):
                raise
            return rows, _one_line(exc, 100)
        return rows, None

    def integrity(self) -> list[str]:
        """PRAGMA integrity_check's findings (["ok"] for a sound file, at most 20), or the error that stopped it."""
        rows, error = self._salvage("PRAGMA integrity_check(20)")
        lines = [line for row in rows for line in str(row[0]).splitlines() if not line.startswith("*** in database")]
        return [_one_line(line) for line in lines] + ([error] if error else [])

    def salvage_ids(self) -> tuple[list[str], list[str]]:
        """(cell keys, run ids) found by every route that may survive damage: each table scanned, its
        primary-key index, and the keys that records and run lists name."""
        routes = (("SELECT key FROM cells NOT INDEXED", "SELECT key FROM cells INDEXED BY sqlite_autoindex_cells_1",
                   "SELECT DISTINCT cell_key FROM records INDEXED BY sqlite_autoindex_records_1",
                   "SELECT DISTINCT cell_key FROM records NOT INDEXED",
                   "SELECT DISTINCT cell_key FROM run_cells NOT INDEXED"),
                  ("SELECT run_id FROM runs NOT INDEXED", "SELECT run_id FROM runs INDEXED BY sqlite_autoindex_runs_1",
                   "SELECT DISTINCT run_id FROM run_cells INDEXED BY sqlite_autoindex_run_cells_1",
                   "SELECT DISTINCT run_id FROM run_cells NOT INDEXED"))
        found: tuple[dict[str, None], dict[str, None]] = ({}, {})
        for ids, queries in zip(found, routes, strict=True):
            for sql in queries:
                ids.update((row[0], None) for row in self._salvage(sql)[0] if isinstance(row[0], str))
        return list(found[0]), list(found[1])

    def _salvage_read(self, read: Callable[[bool], tuple[Any, list[tuple]]],
                      problem_of: Callable[[Any, list[tuple]], str | None]) -> tuple[Any, list[tuple], str | None]:
        """(head, rows, None) of the first intact `read(scan)`, through the indexes then scanning the tables; else
        (head, rows) of the last read that found anything and the last problem; (None, [], None) if none found any."""
        problem: str | None = None
        found, seen = False, (None, [])  # type: tuple[bool, tuple[Any, list[tuple]]]
        for scan in (False, True):
            try:
                head, rows = read(scan)
            except StoreError as exc:
                problem, found = exc.detail, True
                continue
            if head is not None or rows:
                found, seen = True, (head, rows)
            problem = problem_of(head, rows)
            if problem is None:
                return head, rows, None
        return (*seen, problem if found else None)

    def salvage_cell(self, key: str) -> tuple[Any, list[tuple], str | None]:
        """(head, records, problem) of a cell read through its indexes, else by scanning the tables.

        problem is None for an intact cell; head is None, records empty and problem None when
        nothing of the cell is found at all (a key only a damaged index still names).
        """
        return self._salvage_read(lambda scan: self._read_cell(key, scan),
                                  lambda head, rows: self._problem(key, head, rows) if head is not None
                                  else f"no cell row ({len(rows)} records)")

    def salvage_run(self, run_id: str) -> tuple[Any, list[tuple], str | None]:
        """(head, run_cells rows, problem) of a run read through its indexes, else by scanning; like salvage_cell,
        but nothing of a damaged run is returned."""
        head, rows, problem = self._salvage_read(lambda scan: self._read_run(run_id, scan),
                                                 lambda head, rows: self._salvaged_run_problem(run_id, head, rows))
        return (head, rows, None) if problem is None else (None, [], problem)

    def _salvaged_run_problem(self, run_id: str, head: Any, rows: list[tuple]) -> str | None:
        """What is wrong with a run's row and cell list as read (None: nothing)."""
        if head is None:
            return "no run row"
        problem = self._run_problem(head, rows)
        if problem is None and head[0] != run_id:
            problem = "its row names another run"
        if problem is None:
            try:
                json.loads(head[2]), json.loads(head[3])
                [_listed_cell(key, config) for _, key, config in rows]
            except (ValueError, TypeError, KeyError) as exc:
                problem = f"undecodable settings or cell list ({_one_line(exc, 60)})"
        return problem

    def live_claims(self) -> list[str]:
        """'pid N on HOST' of the processes holding live claims (a run writing into this store now)."""
        live = []
        for owner, host, pid, beat in self._salvage("SELECT owner, host, pid, heartbeat FROM claims")[0]:
            with suppress(ValueError, TypeError, OverflowError):
                if ClaimOwner(owner, host, int(pid)).alive(float(beat)):
                    live.append(_one_line(f"pid {pid} on {host}"))
        return live

    def copy_cell(self, key: str, head: Any, rows: list[tuple]) -> None:
        """Write a cell read from another store (`salvage_cell`): same values and finish time, sealed anew."""
        with self.transaction() as conn:
            conn.execute("INSERT INTO cells (key, config, info, finished) VALUES (?, ?, ?, ?)",
                         (key, head[1], head[2], head[4]))
            conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [(key, *row) for row in rows])
            self._seal_cell(conn, key)

    def copy_run(self, head: Any, rows: list[tuple]) -> None:
        """Write a run read from another store (`salvage_run`): same id, settings, creation time and cell list."""
        with self.transaction() as conn:
            conn.execute(f"INSERT INTO runs ({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?)", tuple(head[:5]))
            conn.executemany("INSERT INTO run_cells VALUES (?, ?, ?, ?)", [(head[0], *row) for row in rows])
            conn.execute("UPDATE runs SET checksum=? WHERE run_id=?", (self._stored_run_checksum(head[0]), head[0]))


def claim_rounds(store: Store, owner: ClaimOwner, named: Sequence[tuple[str, T]],
                 work: Callable[[Iterator[T]], None], *, poll_seconds: float,
                 waiting: Callable[[T, str], None], done: Callable[[str], bool] | None = None) -> int:
    """Claim each (claim key, item) for `owner` once no other live process holds it; returns how many were done.

    Round by round `work` gets an iterator over the items claimed for this process, each claimed
    only when `work` asks for the next: a local run computes one cell before it claims another (so
    concurrent runs share the grid), while Ray takes a whole round at once. `work` must exhaust it.
    An item another live process holds is announced once to `waiting` (with that process) and
    looked at again after `poll_seconds`, until it is done (reused, counted) or free (claimed).
    `done` says when a key needs no work before it is claimed (default: `Store.claim`'s stored cells).
    """
    pending, reused = list(named), [0]
    announced: set[str] = set()
    while pending:
        later: list[tuple[str, T]] = []
        work(_claim_round(store, owner, pending, later, announced, reused, waiting, done))
        if later:
            time.sleep(poll_seconds)
        pending = later
    return reused[0]


def _claim_round(store: Store, owner: ClaimOwner, pending: list[tuple[str, T]], later: list[tuple[str, T]],
                 announced: set[str], reused: list[int], waiting: Callable[[T, str], None],
                 done: Callable[[str], bool] | None) -> Iterator[T]:
    """One round of `claim_rounds`: yields the items claimed now; adds busy ones to `later`, counts done ones."""
    for name, item in pending:
        state = "done" if done is not None and done(name) else store.claim(name, owner)
        if state == "mine":
            yield item
        elif state == "done":
            reused[0] += 1
        else:
            if name not in announced:
                waiting(item, store.claim_holder(name))
                announced.add(name)
            later.append((name, item))
