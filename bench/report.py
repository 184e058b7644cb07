"""Regenerates every table of a run from the results store alone."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.store import Store
from bench.tables import accuracy_frame, accuracy_pivot, to_text, write_accuracy_tables


def run_records(store: Store, run_id: str):
    """[(cell, records)] for every cell of a run, in the run's order (unfinished cells have none)."""
    return [(cell, store.records(key)) for key, cell in store.run_cells(run_id)]


def write_report(store: Store, run_id: str, run_dir: Path) -> dict[str, Any]:
    """Write the run's tables under run_dir; returns the terminal text and the paths."""
    info = store.run_info(run_id)
    cells = run_records(store, run_id)
    frame = accuracy_frame(cells, info["settings"]["l_attack"])
    paths = write_accuracy_tables(frame, run_dir)
    (run_dir / "run.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    missing = sum(1 for _, records in cells if not records)
    text = "Accuracy under attack, % [95% Clopper-Pearson interval]\n" + to_text(accuracy_pivot(frame))
    if missing:
        text += f"({missing} cell(s) of this run have not finished; re-run the same command to resume)\n"
    return {"text": text, "paths": paths, "frame": frame}
