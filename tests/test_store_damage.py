"""A damaged results store: every command that reads it succeeds with the intact results or ends in one line, exit 2.

One small real run is built once; copies of its store are then damaged (bit flips and
overwritten bytes on every kind of page) and each copy is read by report, compare, baseline,
store check and a re-run of the same profile, in process.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import struct
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

import bench.core.atomic
import bench.reporting.report
from bench.cli.commands import main

PROFILE = """
[run]
examples = 400
seed = 0
batch_size = 200
[defenses.plain]
defense = "undefended"
params = { steps = 30, batch_size = 32 }
[attacks.pgd_linf]
eps = [0.1, 0.3]
params = { steps = 3 }
"""
CELLS = 3
TABLE = "accuracy_under_attack.csv"  # computed from records only: equal after a recomputation


@dataclass
class Intact:
    results: Path
    run_id: str
    profile: Path
    tables: dict[str, str]  # every CSV a report writes, by name
    baseline: dict
    records: dict[str, list]  # cell key -> record rows without their timing column


@pytest.fixture(scope="module", autouse=True)
def fast_reports():
    """Figures and fsyncs cost most of a report's time and are not what these tests check."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench.reporting.report, "write_figures", lambda frames, folder: {})
        patch.setattr(bench.core.atomic, "_sync", lambda *args: None, raising=False)
        patch.setattr(bench.core.atomic, "_sync_folder", lambda *args: None, raising=False)
        yield


def cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI run in this process; an uncaught exception propagates."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def stored_records(store: Path, keys=None) -> dict[str, list]:
    """{cell key: record rows without their timing column} of `keys` (default: every cell), read with plain SQLite."""
    conn = sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)
    try:
        keys = keys or [key for (key,) in conn.execute("SELECT key FROM cells")]
        return {key: conn.execute("SELECT idx, label, clean_pred, adv_pred, norm, radius, forward_passes "
                                  "FROM records WHERE cell_key=? ORDER BY idx", (key,)).fetchall() for key in keys}
    finally:
        conn.close()


def csv_tables(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.glob("*.csv"))}


@pytest.fixture(scope="module")
def intact(tmp_path_factory, fast_reports) -> Intact:
    root = tmp_path_factory.mktemp("intact")
    profile = root / "damage.toml"
    profile.write_text(PROFILE)
    results = root / "results"
    code, out, err = cli("run", profile, "--results", results, "--quiet")
    assert code == 0, err
    assert f"{CELLS} cell(s) computed" in out
    run_id = next(p.name for p in results.iterdir() if p.is_dir() and p.name.startswith("damage-"))
    code, _, err = cli("baseline", run_id, "--results", results, "--out", root / "baseline")
    assert code == 0, err
    assert not (results / "store.sqlite-wal").exists() or (results / "store.sqlite-wal").stat().st_size == 0
    assert (results / "store.sqlite").stat().st_size > 135_000  # the offsets 40,000 / 90,000 / 130,000 exist
    baseline = json.loads((root / "baseline" / "baseline.json").read_text())
    return Intact(results, run_id, profile, csv_tables(results / run_id), baseline,
                  stored_records(results / "store.sqlite"))


def damaged_copy(intact: Intact, folder: Path, damage: list[tuple[int, bytes | int]]) -> Path:
    """A results folder like the intact one whose store has `damage` applied: (offset, new bytes) or
    (offset, bit number to flip)."""
    folder.mkdir(parents=True)
    shutil.copytree(intact.results / "models", folder / "models", copy_function=os.link)
    data = bytearray((intact.results / "store.sqlite").read_bytes())
    for offset, change in damage:
        if isinstance(change, int):
            data[offset] ^= 1 << change
        else:
            data[offset:offset + len(change)] = change
    (folder / "store.sqlite").write_bytes(bytes(data))
    return folder


# ----------------------------------------------------------------------------- where to damage
def _varint(page: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        byte = page[pos + i]
        if i == 8:
            return (value << 8) | byte, pos + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos + i + 1
    raise AssertionError("unreachable")


def page_map(store: Path) -> tuple[int, dict[int, tuple[str, str]]]:
    """(page size, {page number: (b-tree name, "interior" | "leaf")}) of every b-tree page."""
    data = store.read_bytes()
    size = struct.unpack(">H", data[16:18])[0]
    conn = sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)
    roots = [("sqlite_master", 1), *conn.execute("SELECT name, rootpage FROM sqlite_master WHERE rootpage > 0")]
    conn.close()
    pages: dict[int, tuple[str, str]] = {}
    for name, root in roots:
        todo = [root]
        while todo:
            number = todo.pop()
            page = data[(number - 1) * size:number * size]
            head = 100 if number == 1 else 0
            kind = page[head]
            pages[number] = (name, "interior" if kind in (2, 5) else "leaf")
            if kind in (2, 5):
                cells = struct.unpack(">H", page[head + 3:head + 5])[0]
                todo.append(struct.unpack(">I", page[head + 8:head + 12])[0])
                for i in range(cells):
                    pointer = struct.unpack(">H", page[head + 12 + 2 * i:head + 14 + 2 * i])[0]
                    todo.append(struct.unpack(">I", page[pointer:pointer + 4])[0])
    return size, pages


def sweep_plan(store: Path, per_page: int = 5, seed: int = 27) -> list[tuple[int, bytes | int, str]]:
    """Seeded damage on every page: its b-tree header, its cell pointers and its content, as single bit
    flips and as 4 overwritten bytes; plus the file header. (offset, change, what was hit)."""
    rng = random.Random(seed)
    data = store.read_bytes()
    size, pages = page_map(store)
    plan: list[tuple[int, bytes | int, str]] = []
    for offset in rng.sample(range(100), 6):  # the file header (page size, counters, schema cookie, ...)
        plan.append((offset, rng.randrange(8), "file header"))
    for number in range(1, len(data) // size + 1):
        name, kind = pages.get(number, ("unused", "other"))
        base = (number - 1) * size
        head = base + (100 if number == 1 else 0)
        content = struct.unpack(">H", data[head + 5:head + 7])[0] or size if number in pages else 0
        regions = [(head, head + 12), (head + 12, head + 20)] + [(base + content, base + size)] * (per_page - 2)
        for i, (low, high) in enumerate(regions):
            offset = rng.randrange(low, max(high, low + 1))
            change: bytes | int = rng.randrange(8) if i % 2 else rng.randbytes(4)
            plan.append((min(offset, len(data) - 4), change, f"{name} {kind}"))
    return plan


# ----------------------------------------------------------------------------- judging outcomes
class Judge:
    """Runs the reading commands on a damaged copy and classifies each outcome (or records a failure)."""

    def __init__(self, intact: Intact):
        self.intact = intact
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []

    def _fail(self, label: str, message: str) -> None:
        self.failures.append(f"{label}: {message}")

    def _call(self, label: str, *args) -> tuple[int, str, str] | None:
        try:
            return cli(*args)
        except Exception:  # what this test exists to find: a traceback instead of one line
            self._fail(label, traceback.format_exc(limit=-4))
            return None

    def _one_line(self, label: str, err: str) -> bool:
        lines = err.splitlines()
        ok = (len(lines) >= 1 and lines[-1].startswith("pixeldp-bench: error: ")
              and all(line.startswith("pixeldp-bench: warning: ") for line in lines[:-1]))
        if not ok:
            self._fail(label, f"exit 2 without a one-line error: {err!r}")
        return ok

    def judge(self, label: str, results: Path) -> dict[str, str]:
        """{command: "ok" | "error" | "damaged" | "recomputed"} for one damaged copy."""
        seen: dict[str, str] = {}
        store = results / "store.sqlite"
        before = store.read_bytes()
        self._check(label, results, seen)
        self._reads(label, results, seen)
        if store.read_bytes() != before:
            self._fail(label, "a reading command wrote to the damaged store")
        if seen.get("check") == "ok" and "error" in seen.values():
            self._fail(label, f"store check found nothing but a command failed: {seen}")
        self._rerun(label, results, seen)
        self.outcomes.update(f"{command} {result}" for command, result in seen.items())
        return seen

    def _check(self, label: str, results: Path, seen: dict[str, str]) -> None:
        """store check: exit 0 (healthy), 1 (damage listed, one summary line on stderr) or a one-line error."""
        checked = self._call(label, "store", "check", results)
        if checked is None:
            return
        code, out, err = checked
        if code == 1:
            seen["check"] = "damaged"
            if not err.startswith("pixeldp-bench: store check failed:") or err.count("\n") != 1:
                self._fail(label, f"store check: {err!r}")
        elif code == 2:
            seen["check"] = "error" if self._one_line(label + " check", err) else "bad"
        else:
            seen["check"] = "ok" if code == 0 else "bad"

    def _reads(self, label: str, results: Path, seen: dict[str, str]) -> None:
        """report, compare and baseline: the intact run's tables, comparison and export, or a one-line error."""
        intact = self.intact
        reads = (("report", ("report", intact.run_id, "--results", results)),
                 ("compare", ("compare", intact.results / intact.run_id, results / intact.run_id, "--all")),
                 ("baseline", ("baseline", intact.run_id, "--results", results, "--out", results / "export")))
        for name, args in reads:
            called = self._call(f"{label} {name}", *args)
            if called is None:
                continue
            code, out, err = called
            if code == 2:
                seen[name] = "error" if self._one_line(f"{label} {name}", err) else "bad"
                continue
            if code != 0:
                self._fail(f"{label} {name}", f"exit {code}: {err!r}")
                continue
            seen[name] = "ok"
            if name == "report" and csv_tables(results / intact.run_id) != intact.tables:
                self._fail(f"{label} report", "tables differ from the intact ones")
            if name == "compare" and "0 regression(s), 0 improvement(s)" not in out:
                self._fail(f"{label} compare", f"differs from the intact run: {out[-300:]!r}")
            if name == "baseline" and json.loads((results / "export" / "baseline.json").read_text()) != intact.baseline:
                self._fail(f"{label} baseline", "export differs from the intact one")

    def _rerun(self, label: str, results: Path, seen: dict[str, str]) -> None:
        """The same profile into the damaged folder: every cell reused or recomputed, tables correct; or one line."""
        called = self._call(f"{label} run", "run", self.intact.profile, "--results", results, "--quiet")
        if called is None:
            return
        code, out, err = called
        if code == 2:
            seen["run"] = "error" if self._one_line(f"{label} run", err) else "bad"
            return
        if code != 0:
            self._fail(f"{label} run", f"exit {code}: {err!r}")
            return
        counts = next(line for line in out.splitlines() if "cell(s) computed" in line)
        computed = int(counts.split()[0])
        seen["run"] = "recomputed" if computed else "ok"
        if computed + int(counts.split()[3]) != CELLS:
            self._fail(f"{label} run", counts)
        run_dir = Path(out.splitlines()[-1].removeprefix("tables written to "))
        if (run_dir / TABLE).read_text() != self.intact.tables[TABLE]:
            self._fail(f"{label} run", f"{TABLE} differs from the intact one")
        records = stored_records(results / "store.sqlite", list(self.intact.records))
        for key, rows in self.intact.records.items():
            if records.get(key) != rows:
                self._fail(f"{label} run", f"cell {key} holds other records than the intact one")


# ----------------------------------------------------------------------------- the tests
def test_flipped_bit_in_a_record_is_detected_recomputed_and_the_table_is_correct(intact, tmp_path):
    store = intact.results / "store.sqlite"
    size, pages = page_map(store)
    data = store.read_bytes()
    # The label of the first record (on a records leaf page) whose label is a one-byte integer >= 2.
    for number, (name, kind) in sorted(pages.items()):
        if (name, kind) != ("records", "leaf"):
            continue
        page = data[(number - 1) * size:number * size]
        pointer = struct.unpack(">H", page[12:14])[0]
        _, pos = _varint(page, pointer)  # payload length
        _, pos = _varint(page, pos)  # rowid
        header_length, cursor = _varint(page, pos)
        types = []
        while cursor < pos + header_length:
            serial, cursor = _varint(page, cursor)
            types.append(serial)
        key_length = (types[0] - 13) // 2
        body = pos + header_length
        key = page[body:body + key_length].decode()
        label_at = body + key_length + {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8, 8: 0, 9: 0}[types[1]]
        if types[2] == 1 and page[label_at] >= 2:
            offset = (number - 1) * size + label_at
            break
    else:
        pytest.fail("no record with a one-byte label")
    results = damaged_copy(intact, tmp_path / "flip", [(offset, 0)])
    assert stored_records(results / "store.sqlite")[key] != intact.records[key]  # one label really changed

    code, out, err = cli("report", intact.run_id, "--results", results)
    assert code == 2 and err.count("\n") == 1 and f"(key {key})" in err and "damaged" in err, err
    code, out, err = cli("store", "check", results)
    assert code == 1 and "damaged cell mnist5k/plain/" in out and key in out, out
    code, out, err = cli("run", intact.profile, "--results", results, "--quiet")
    assert code == 0, err
    assert f"1 cell(s) computed, {CELLS - 1} reused" in out
    assert err.startswith("pixeldp-bench: warning: cell mnist5k/plain/") and key in err and err.count("\n") == 1
    run_dir = Path(out.splitlines()[-1].removeprefix("tables written to "))
    assert (run_dir / TABLE).read_text() == intact.tables[TABLE]
    assert stored_records(results / "store.sqlite") == intact.records
    assert cli("store", "check", results)[0] == 0


def test_the_three_offsets_of_the_issue(intact, tmp_path):
    junk = b"\xde\xad\xbe\xef" * 2
    results = damaged_copy(intact, tmp_path / "three", [(40_000, junk), (90_000, junk), (130_000, junk)])
    judge = Judge(intact)
    seen = judge.judge("offsets 40000/90000/130000", results)
    print(seen)
    assert not judge.failures, "\n".join(judge.failures)
    assert seen["check"] == "damaged"


@pytest.mark.slow
def test_damage_sweep_never_gives_a_traceback(intact, tmp_path):
    plan = sweep_plan(intact.results / "store.sqlite")
    assert len(plan) >= 200
    judge = Judge(intact)
    hit: Counter[str] = Counter()
    for n, (offset, change, where) in enumerate(plan):
        hit[where] += 1
        kind = f"bit {change}" if isinstance(change, int) else f"bytes {change.hex()}"
        judge.judge(f"offset {offset} ({where}, {kind})", damaged_copy(intact, tmp_path / f"c{n}", [(offset, change)]))
        shutil.rmtree(tmp_path / f"c{n}")
    print(f"\n{len(plan)} damaged copies; pages hit: {dict(sorted(hit.items()))}")
    print("outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(judge.outcomes.items())))
    assert not judge.failures, f"{len(judge.failures)} failure(s):\n" + "\n".join(
        f.splitlines()[0][:200] + " ... " + f.splitlines()[-1][:300] for f in judge.failures)
    assert judge.outcomes["check damaged"] > 0 and judge.outcomes["run recomputed"] > 0


def test_recover_keeps_the_intact_cells_and_a_rerun_computes_only_the_lost_ones(intact, tmp_path):
    size, pages = page_map(intact.results / "store.sqlite")
    leaves = [n for n, (name, kind) in sorted(pages.items()) if (name, kind) == ("records", "leaf")]
    junk = b"\xff" * 16
    # A records leaf early in the file (damages one or two cells), the cells table, and a late records leaf.
    cells_page = next(n for n, (name, _) in pages.items() if name == "cells")
    damage = [((leaves[1] - 1) * size + 8, junk), ((cells_page - 1) * size + size - 40, junk),
              ((leaves[-2] - 1) * size + 8, junk)]
    results = damaged_copy(intact, tmp_path / "recover", [(offset, change) for offset, change in damage])
    damaged_bytes = (results / "store.sqlite").read_bytes()

    code, out, err = cli("store", "recover", results)
    assert code == 0, err
    summary = next(line for line in out.splitlines() if line.startswith("recovered "))
    saved, lost = int(summary.split()[1]), int(summary.split(";")[1].split()[1])
    print(out)
    assert saved + lost == CELLS and lost >= 1
    aside = next(results.glob("store.damaged-*.sqlite"))
    assert aside.read_bytes() == damaged_bytes  # moved aside, byte for byte
    assert cli("store", "check", results)[0] == 0
    code, out, err = cli("run", intact.profile, "--results", results, "--quiet")
    assert code == 0, err
    assert f"{lost} cell(s) computed, {saved} reused" in out
    assert stored_records(results / "store.sqlite") == intact.records
