"""`pixeldp-bench store check | recover`: verify a results store, or copy its intact cells and runs into a new one."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.execution.store import STORE_NAME, Store, StoreError, describe_config
from bench.cli.session import default_results_dir

__all__ = ["add_parser", "check_store", "recover_store"]

SIDE_FILES = ("-wal", "-shm")  # SQLite's files beside a store: they travel with it when it is moved aside


def _store_path(args: argparse.Namespace) -> Path:
    """The store of RESULTS (or --results, or the default results folder); it must exist."""
    given = args.folder or args.results
    results = Path(given).expanduser().resolve() if given else default_results_dir()
    path = results if results.is_file() else results / STORE_NAME
    if not path.is_file():
        raise StoreError(f"no results store at {path}; pass the results folder (or --results DIR)")
    return path


def _runs(store: Store, run_ids: list[str]) -> tuple[list[tuple[str, Any, list[tuple], str | None]], dict[str, str]]:
    """Each run salvaged (run id, head, cell list, problem), and the config texts its cell lists give by cell
    key: they name a cell whose own row is unreadable."""
    runs = [(run_id, *store.salvage_run(run_id)) for run_id in run_ids]
    configs = {key: config for _, _, rows, _ in runs for _, key, config in rows}
    return runs, configs


def _name(key: str, head: Any, configs: dict[str, str]) -> str:
    return describe_config(key, head[1] if head is not None else configs.get(key))


def check_store(path: Path, out: Any = None) -> tuple[list[str], dict[str, int]]:
    """Verify a store: PRAGMA integrity_check, every cell's checksum and record count, every run's checksum.

    Prints a report to `out`; returns (one line per problem found, counts).
    """
    out = out or sys.stdout
    store = Store(path, readonly=True)
    try:
        problems: list[str] = []
        integrity = store.integrity()
        if integrity != ["ok"]:
            problems += [f"integrity_check: {line}" for line in integrity]
        keys, run_ids = store.salvage_ids()
        runs, configs = _runs(store, run_ids)
        counts = {"cells": 0, "records": 0, "unsealed": 0, "damaged cells": 0, "runs": 0, "damaged runs": 0}
        for key in keys:
            head, rows, problem = store.salvage_cell(key)
            if head is None and problem is None:
                continue  # a key only a damaged index names: integrity_check reports that index
            counts["cells"] += 1
            counts["records"] += len(rows)
            if problem is None:
                counts["unsealed"] += head[3] is None
            else:
                counts["damaged cells"] += 1
                problems.append(f"damaged cell {_name(key, head, configs)}: {problem}")
        for run_id, head, _, problem in runs:
            if head is None and problem is None:
                continue
            counts["runs"] += 1
            if problem is not None:
                counts["damaged runs"] += 1
                problems.append(f"damaged run {run_id}: {problem}")
    finally:
        store.close()
    print(f"results store {path}: integrity_check {'ok' if integrity == ['ok'] else 'FAILED'}; "
          f"{counts['cells']} cell(s) with {counts['records']} record(s), {counts['runs']} run(s)", file=out)
    if counts["unsealed"]:
        print(f"{counts['unsealed']} cell(s) were written before checksums and checked by record count only "
              "(a `run` into this folder adds their checksums)", file=out)
    for line in problems:
        print(line, file=out)
    return problems, counts


def cmd_check(args: argparse.Namespace) -> int:
    path = _store_path(args)
    problems, counts = check_store(path)
    if not problems:
        print(f"healthy: {counts['cells']} cell(s) and {counts['runs']} run(s) verified")
        return 0
    print(f"pixeldp-bench: store check failed: {path} is damaged ({len(problems)} problem(s): "
          f"{counts['damaged cells']} damaged cell(s), {counts['damaged runs']} damaged run(s)); run "
          f"`pixeldp-bench store recover --results {path.parent}` to keep the intact cells", file=sys.stderr)
    return 1


def _free_name(folder: Path, stem: str, stamp: str) -> Path:
    """folder/store.<stem>-<stamp>.sqlite, suffixed -2, -3, ... when taken (with its side files)."""
    for n in range(1, 1000):
        path = folder / f"store.{stem}-{stamp}{'' if n == 1 else f'-{n}'}.sqlite"
        if not any(Path(f"{path}{side}").exists() for side in ("", *SIDE_FILES)):
            return path
    raise StoreError(f"cannot find a free name for store.{stem}-{stamp}.sqlite in {folder}; tidy the folder")


def _move(source: Path, target: Path | None) -> None:
    """Rename a store with its WAL side files (left behind, SQLite would replay a WAL into the wrong database);
    target None deletes them."""
    for side in ("", *SIDE_FILES):
        if Path(f"{source}{side}").exists():
            if target is None:
                Path(f"{source}{side}").unlink()
            else:
                Path(f"{source}{side}").rename(f"{target}{side}")


def recover_store(path: Path, out: Any = None) -> dict[str, Any]:
    """Copy every intact cell and run of the store at `path` into a new store, then swap it in.

    The damaged file is renamed (its bytes untouched) to store.damaged-<UTC time>.sqlite with its
    WAL files, and the recovered store takes its place. Returns saved/lost counts and the paths.
    """
    out = out or sys.stdout
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"results folder {path.parent} is not writable: the recovered store goes beside the damaged "
                         "one; copy the folder somewhere writable and recover there")
    old = Store(path, salvage=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    saved, runs_saved = 0, 0
    lost: list[str] = []
    runs_lost: list[str] = []
    try:
        live = old.live_claims()
        if live:
            raise StoreError(f"{path} is being written by {', '.join(live[:3])}; stop that run, then recover")
        keys, run_ids = old.salvage_ids()
        runs, configs = _runs(old, run_ids)
        new_path = _free_name(path.parent, "recovered", stamp)
        new = Store(new_path)
        try:
            for key in keys:
                head, rows, problem = old.salvage_cell(key)
                if head is not None and problem is None:
                    new.copy_cell(key, head, rows)
                    saved += 1
                elif problem is not None:
                    lost.append(f"lost cell {_name(key, head, configs)}: {problem}")
            for run_id, head, rows, problem in runs:
                if head is not None and problem is None:
                    new.copy_run(head, rows)
                    runs_saved += 1
                elif problem is not None:
                    runs_lost.append(f"lost run {run_id}: {problem}")
        except BaseException:
            new.close()
            _move(new_path, None)  # a half-written copy is worth nothing
            raise
        new.close()
    finally:
        old.close()
    aside = _free_name(path.parent, "damaged", stamp)
    _move(path, aside)
    _move(new_path, path)
    for line in lost + runs_lost:
        print(line, file=out)
    print(f"recovered {saved} cell(s) and {runs_saved} run(s); lost {len(lost)} cell(s) and {len(runs_lost)} run(s)",
          file=out)
    print(f"the damaged store was moved, unchanged, to {aside}; {path} is now the recovered store", file=out)
    if lost or runs_lost:
        print(f"re-run your profile(s) with --results {path.parent}: only the lost cells are computed again", file=out)
    return {"saved": saved, "lost": len(lost), "runs_saved": runs_saved, "runs_lost": len(runs_lost),
            "damaged": aside, "store": path}


def cmd_recover(args: argparse.Namespace) -> int:
    recover_store(_store_path(args))
    return 0


def add_parser(sub: Any) -> None:
    """Register `store check` and `store recover` on the CLI's subparsers."""
    store = sub.add_parser("store", help="check a results store, or recover the intact cells of a damaged one")
    tools = store.add_subparsers(dest="store_command", required=True)
    check = tools.add_parser("check", help="verify store.sqlite: integrity_check, each cell's checksum and record "
                             "count, each run's checksum; exit 1 when damaged")
    recover = tools.add_parser("recover", help="copy every intact cell and run into a new store.sqlite; the damaged "
                               "file is kept, unchanged, as store.damaged-<time>.sqlite")
    for parser, func in ((check, cmd_check), (recover, cmd_recover)):
        parser.add_argument("folder", nargs="?", metavar="RESULTS", help="results folder holding store.sqlite "
                            "(default: $PIXELDP_BENCH_RESULTS or <repo>/results)")
        parser.add_argument("--results", help="the same as RESULTS")
        parser.set_defaults(func=func)
