"""A run exported to one self-contained JSON file (a committed regression baseline) and read back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.store import Store
from bench.types import Cell, Record

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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, sort_keys=True, separators=(",", ":")) + "\n")
    return path


def load_export(path: Path) -> tuple[Store, str]:
    """An in-memory store holding the exported run, and its run id."""
    payload: dict[str, Any] = json.loads(Path(path).read_text())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pixeldp-bench run export (format {payload.get('format')!r}, "
                         f"expected {FORMAT!r})")
    run = payload["run"]
    store = Store(Path(":memory:"))
    keyed = [(c["key"], Cell(**c["config"])) for c in payload["cells"]]
    store.start_run(run["run_id"], run["profile"], run["settings"], run["environment"], keyed)
    for (key, cell), entry in zip(keyed, payload["cells"]):
        columns = entry["records"]
        records = [Record(*values) for values in zip(*(columns[f] for f in RECORD_FIELDS))]
        store.write_cell(key, cell, records, entry["info"] or {})
    return store, run["run_id"]
