"""A disk that fills at any file the harness writes: one error line, no partial file, nothing good lost, rerun works.

Every file goes through bench.core.atomic. A counting run records each write the command makes; then the
command is run again once per write, the k-th failing with ENOSPC (while the temporary file is
flushed, or while it is renamed over the target).
"""
from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import bench.core.atomic
from bench.cli.commands import main

TINY = """
[run]
examples = 10
seed = 0
batch_size = 10
[defenses.plain]
defense = "undefended"
params = { steps = 3, batch_size = 16 }
[attacks.pgd_linf]
eps = [0.3]
params = { steps = 2 }
"""
STORE_FILES = ("store.sqlite", "store.sqlite-wal", "store.sqlite-shm", "store.sqlite-journal")
TABLE_SUFFIXES = (".csv", ".md", ".tex")


@dataclass
class Disk:
    """Stands between bench.core.atomic and the disk: records each file written; the `fail_at`-th (0-based) fails."""

    fail_at: int | None = None
    stage: str = "sync"  # "sync": the temporary file's flush fails; "replace": its rename over the target
    written: list[Path] = field(default_factory=list)  # targets, in order (the failed one last)
    finished_cells: list[int] = field(default_factory=list)  # cells in the store when each write began
    store: Path | None = None

    def install(self, monkeypatch) -> Disk:
        sync, replace = bench.core.atomic._sync, bench.core.atomic._replace

        def counted_sync(tmp: Path) -> None:
            self.written.append(tmp.parent / tmp.name[1:].rsplit(".", 2)[0])  # ".<name>.<random>.tmp"
            self.finished_cells.append(stored_cells(self.store) if self.store else 0)
            self._maybe_fail("sync")
            sync(tmp)

        def failing_replace(tmp: Path, target: Path) -> None:
            self._maybe_fail("replace")
            replace(tmp, target)

        monkeypatch.setattr(bench.core.atomic, "_sync", counted_sync)
        monkeypatch.setattr(bench.core.atomic, "_replace", failing_replace)
        return self

    def _maybe_fail(self, stage: str) -> None:
        if stage == self.stage and len(self.written) - 1 == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")


def stored_cells(store: Path) -> int:
    if not store.is_file():
        return 0
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:  # created, not yet initialised
        return 0
    finally:
        conn.close()


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` but the SQLite store (written by SQLite, not by bench.core.atomic)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in STORE_FILES}


def tables_of(folder: Path, stems: tuple[str, ...] | None = None) -> dict[str, bytes]:
    # history.* shows every run of the profile in the store, the interrupted one included: not this run's tables.
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix in TABLE_SUFFIXES and (stems is None or p.stem in stems) and not p.stem.startswith("history")}


def latest_run(results: Path) -> Path:
    return max((p for p in results.iterdir() if p.is_dir() and p.name.startswith("tiny-")), key=lambda p: p.name)


def first_run(results: Path) -> Path:
    return min((p for p in results.iterdir() if p.is_dir() and p.name.startswith("tiny-")), key=lambda p: p.name)


@dataclass(frozen=True)
class Scenario:
    """A command run on a copy of a prepared results folder, and the folder whose tables a rerun must reproduce."""

    name: str

    @property
    def cold(self) -> bool:
        """From an empty results folder (trains, checkpoints, draws figures) instead of a copy of a finished run."""
        return self.name == "cold"

    def command(self, results: Path, profile: Path) -> list:
        first = None if self.cold else first_run(results)
        return {
            "cold": ["run", profile, "--results", results, "--quiet", "--checkpoint-every", "1e-9"],
            "warm": ["run", profile, "--results", results, "--quiet"],
            "report": ["report", first],
            "baseline": ["baseline", first, "--out", results / "baselines" / "tiny"],
            "compare": ["compare", first, first, "--out", results / "comparison"],
        }[self.name]

    def fix(self, results: Path) -> str:
        """How the error line says to redo the command."""
        if self.name in ("cold", "warm"):
            return "re-run the same command: finished cells are kept in the store"
        if self.name == "report":
            return f"re-run `pixeldp-bench report {first_run(results)}`"
        return "re-run the same command"

    def output(self, results: Path) -> Path:
        folders = {"cold": latest_run, "warm": latest_run, "report": first_run,
                   "baseline": lambda r: r / "baselines" / "tiny", "compare": lambda r: r / "comparison"}
        return folders[self.name](results)


def cli(args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(autouse=True)
def reproducible_figures(monkeypatch):
    """PDFs carry their creation date unless SOURCE_DATE_EPOCH fixes it: a redrawn figure is then the same file."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")


@pytest.fixture
def profile(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture
def finished(tmp_path, profile, capsys) -> Path:
    """A results folder holding one finished run, its baseline export and a comparison."""
    results = tmp_path / "finished"
    assert cli(["run", profile, "--results", results, "--quiet"]) == 0
    for name in ("baseline", "compare"):
        assert cli(Scenario(name).command(results, profile)) in (0, 1)
    capsys.readouterr()
    return results


SCENARIOS = [("cold", "sync"), ("warm", "sync"), ("warm", "replace"), ("report", "sync"), ("report", "replace"),
             ("baseline", "sync"), ("compare", "sync"), ("compare", "replace")]


@pytest.mark.slow
@pytest.mark.parametrize("name, stage", SCENARIOS)
def test_a_full_disk_at_every_write(name, stage, tmp_path, profile, finished, capsys, monkeypatch):
    scenario = Scenario(name)

    def prepared(label: str) -> Path:
        results = tmp_path / label
        if scenario.cold:
            results.mkdir()
        else:
            shutil.copytree(finished, results)
        return results

    # The counting run: every file the command writes, and nothing written around bench.core.atomic.
    results = prepared("counting")
    before = snapshot(results)
    counting = Disk(store=results / "store.sqlite")
    with monkeypatch.context() as patch:
        counting.install(patch)
        code = cli(scenario.command(results, profile))
    assert code in (0, 1), capsys.readouterr().err  # compare exits 1 on nothing worse than a regression
    after = snapshot(results)
    changed = {p for p in after if before.get(p) != after[p]}
    around = changed - set(counting.written)
    assert not around, "written around bench.core.atomic: " + ", ".join(map(str, sorted(around)))
    sites = len(counting.written)
    stems = ("accuracy_under_attack",) if scenario.cold else None  # retraining changes the measured timings
    reference = tables_of(scenario.output(results), stems)
    assert reference
    with capsys.disabled():
        print(f"\n{name}/{stage}: {sites} write sites: " + ", ".join(sorted({p.name for p in counting.written})))
    capsys.readouterr()

    for k in range(sites):
        results = prepared(f"fault-{k}")
        before = snapshot(results)
        disk = Disk(fail_at=k, stage=stage, store=results / "store.sqlite")
        command = scenario.command(results, profile)
        with monkeypatch.context() as patch:
            disk.install(patch)
            code = cli(command)
        err = capsys.readouterr().err
        failed = disk.written[k]
        assert code == 2, (k, failed, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err == (f"pixeldp-bench: error: cannot write {failed} (No space left on device); free disk space and "
                       f"{scenario.fix(results)}\n"), err
        after = snapshot(results)
        # No temporary or partial file anywhere; files written before the fault are complete (and allowed).
        assert set(after) <= set(before) | set(disk.written[:k]), (k, failed, set(after) - set(before))
        assert not [p for p in results.rglob(".*.tmp")]
        # Every file that was there before is untouched (or rewritten with the very same bytes).
        assert all(after.get(p) == data for p, data in before.items()), (k, failed)
        # The store keeps every cell finished before the fault.
        assert stored_cells(results / "store.sqlite") == (counting.finished_cells[k] if scenario.cold
                                                          else stored_cells(finished / "store.sqlite"))
        assert cli(command) in (0, 1), capsys.readouterr().err
        capsys.readouterr()
        assert tables_of(scenario.output(results), stems) == reference, (k, failed)
    assert sites >= {"cold": 15, "warm": 12, "report": 12, "baseline": 2, "compare": 3}[name]


# ------------------------------------------------------------------------------ the writer itself
def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_replaces_whole_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "table.md"
    assert bench.core.atomic.write_text(target, "one\n") == target
    bench.core.atomic.write_bytes(target, b"two\r\n")  # bytes as given: no newline translation
    assert target.read_bytes() == b"two\r\n" and [p.name for p in target.parent.iterdir()] == ["table.md"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_library_that_fails_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / "figure.pdf"
    target.write_bytes(b"the good figure")

    def half_then_full(path: Path) -> None:
        path.write_bytes(b"half a fig")
        full_disk()

    with pytest.raises(bench.core.atomic.OutputWriteError) as info, bench.core.atomic.atomic_path(target) as tmp:
        half_then_full(tmp)
    assert str(info.value) == (f"cannot write {target} (No space left on device); free disk space and re-run the "
                               "same command")
    assert target.read_bytes() == b"the good figure" and [p.name for p in tmp_path.iterdir()] == ["figure.pdf"]


def test_other_errors_propagate_unchanged_and_clean_up(tmp_path):
    target = tmp_path / "model.safetensors"
    with pytest.raises(KeyError), bench.core.atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
        raise KeyError("a bug keeps its traceback")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("code, remedy", [(errno.EACCES, "make {folder} writable"),
                                          (errno.EROFS, "make {folder} writable"),
                                          (errno.EIO, "fix that")])
def test_the_message_fits_the_error_and_the_command(code, remedy, tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(bench.core.atomic, "_replace", refuse)
    with pytest.raises(bench.core.atomic.OutputWriteError) as info, \
            bench.core.atomic.advice("re-run `pixeldp-bench report X`"):
        bench.core.atomic.write_text(tmp_path / "run.json", "{}")
    assert str(info.value) == (f"cannot write {tmp_path / 'run.json'} ({os.strerror(code)}); "
                               f"{remedy.format(folder=tmp_path)} and re-run `pixeldp-bench report X`")
    assert not list(tmp_path.iterdir())


def test_a_model_shipped_by_ray_onto_a_full_disk(tmp_path, monkeypatch):
    from bench.execution.ray_executor import _store_model

    monkeypatch.setattr(bench.core.atomic, "_sync", full_disk)
    with pytest.raises(bench.core.atomic.OutputWriteError, match="m.safetensors"):
        _store_model(tmp_path / "models", "m.safetensors", b"weights")
    assert not list((tmp_path / "models").iterdir())
