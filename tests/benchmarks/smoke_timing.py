"""Seconds per cell family of a smoke run, read from its results store (records' per-example seconds)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from bench.cli.commands import STORE_NAME
from bench.execution.store import Store


def family(cell) -> str:
    """'training+certify' for clean cells, else '<attack label> vs <randomized|deterministic>' (one row per family)."""
    if cell.attack == "none":
        return "clean/certify/overhead"
    kind = "pixeldp" if cell.defense == "pixeldp" else "deterministic"
    return f"{cell.attack_label} ({kind})"


def seconds_per_family(results: Path) -> dict[str, float]:
    """Sum over a results folder's cells of the attack/certify seconds (records) and training seconds (cell info)."""
    store = Store(results / STORE_NAME)
    try:
        totals: dict[str, float] = defaultdict(float)
        trained: set[str] = set()
        for run_id in store.runs()[:1]:  # the cold run; later (warm) runs reuse its cells and would count them twice
            for key, cell in store.run_cells(run_id):
                totals[family(cell)] += sum(r.seconds for r in store.records(key))
                info = (store.cell_info(key) or {}).get("defense", {})
                if info.get("model_file") and info["model_file"] not in trained and not info.get("loaded_from_cache"):
                    trained.add(info["model_file"])
                    totals["training"] += float(info.get("train_seconds") or 0.0)
        return dict(sorted(totals.items(), key=lambda item: -item[1]))
    finally:
        store.close()
