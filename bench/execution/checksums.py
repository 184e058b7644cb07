"""SHA-256 checksums of stored cells and runs, over their values exactly as SQLite returns them.

Canonical encoding: compact JSON (`separators=(",", ":")`, no key sorting needed: only lists) of
the row values in a fixed order. Python's JSON writes ints as ints and floats in `repr` form
(inf as `Infinity`), so a value whose type changed (an INTEGER read back as REAL, a number read
back as TEXT) changes the digest as surely as a flipped bit; BLOBs (only ever left by damage)
are written as {"blob": hex}. The store computes a checksum from the rows it has just written,
read back in the same transaction, so writing and checking encode identical values.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["RECORD_COLUMNS", "cell_checksum", "run_checksum"]

# The records columns a cell checksum covers, in order (cell_key is the cell's own key).
RECORD_COLUMNS = "idx, label, clean_pred, adv_pred, norm, radius, seconds, forward_passes"


def _blob(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"blob": value.hex()}
    raise TypeError(f"cannot encode {type(value).__name__} in a checksum")


def _digest(payload: list[Any]) -> str:
    return hashlib.sha256(json.dumps(payload, separators=(",", ":"), default=_blob).encode()).hexdigest()


def cell_checksum(key: Any, config: Any, info: Any, records: Iterable[Sequence[Any]]) -> str:
    """Checksum of a cell: its key, config and info texts and its record rows (RECORD_COLUMNS) in idx order."""
    return _digest(["cell", key, config, info, list(records)])


def run_checksum(run: Sequence[Any], cells: Iterable[Sequence[Any]]) -> str:
    """Checksum of a run: its runs row (run_id, profile, settings, environment, created) and its
    run_cells rows (position, cell_key, config) in position order."""
    return _digest(["run", list(run), list(cells)])
