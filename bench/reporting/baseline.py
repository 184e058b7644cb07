"""A run exported to one self-contained JSON file (a committed regression baseline) and read back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.core.atomic import write_text
from bench.execution.store import Store, StoreError
from bench.core.types import Cell, Record

__all__ = ["FORMAT", "export_run", "load_export"]

FORMAT = "pixeldp-bench-run/1"
RECORD_FIELDS = ("index", "label", "clean_pred", "adv_pred", "norm", "radius", "seconds", "forward_passes")


def export_run(store: Store, run_id: str, path: Path) -> Path:
    """Write a run (settings, environment, every cell's config, info and records) to `path` as JSON.

    Records are stored column-wise to keep the file small; infinite norms (attack failures) are
    written as JSON's `Infinity`, which Python's json module reads back.
    """
    cells = []
    for key, cell in store.run_cells(run_id):
        records = store.records(key)
        if not records:
            continue  # unfinished cells carry no results
        cells.append({"key": key, "config": cell.config(), "info": store.cell_info(key),
                      "records": {f: [getattr(r, f) for r in records] for f in RECORD_FIELDS}})
    payload = {"format": FORMAT, "run": store.run_info(run_id), "cells": cells}
    return write_text(path, json.dumps(payload, sort_keys=True, separators=(",", ":")) + "\n")


def load_export(path: Path) -> tuple[Store, str]:
    """An in-memory store holding the exported run, and its run id; a bad file raises one StoreError line."""
    try:
        payload: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"cannot read run export {path} ({type(exc).__name__}: {exc}); export the run again with "
                         "`pixeldp-bench baseline`") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise StoreError(f"{path} is not a pixeldp-bench run export (format {found!r}, expected {FORMAT!r})")
    try:
        return _restore(payload)
    except (KeyError, TypeError, ValueError) as exc:  # ValueError: record columns of different lengths
        raise StoreError(f"run export {path} is damaged ({type(exc).__name__}: {exc}); export the run again with "
                         "`pixeldp-bench baseline`") from exc


def _restore(payload: dict[str, Any]) -> tuple[Store, str]:
    """Replay an export's run, cells and records into an in-memory store."""
    run = payload["run"]
    store = Store(Path(":memory:"))
    keyed = [(c["key"], Cell(**c["config"])) for c in payload["cells"]]
    store.start_run(run["run_id"], run["profile"], run["settings"], run["environment"], keyed)
    for (key, cell), entry in zip(keyed, payload["cells"], strict=True):
        columns = entry["records"]
        records = [Record(*values) for values in zip(*(columns[f] for f in RECORD_FIELDS), strict=True)]
        store.write_cell(key, cell, records, entry["info"] or {})
    return store, run["run_id"]
