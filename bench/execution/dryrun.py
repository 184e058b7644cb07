"""`run --dry-run`: what a run would compute or reuse, and why, without training or attacking anything."""
from __future__ import annotations

from typing import Any

from bench.execution.keys import params_digest, slot
from bench.execution.library_versions import NOT_INSTALLED, cell_libraries
from bench.execution.runner import cell_code
from bench.execution.store import Store
from bench.core.types import Cell

__all__ = ["explain", "format_plan"]


def _changed_params(old: Cell, new: Cell) -> list[str]:
    """Names of the configuration entries that differ between two cells of one slot."""
    before, after = old.config(), new.config()
    names = []
    for field in sorted(set(before) | set(after)):
        a, b = before.get(field), after.get(field)
        if isinstance(a, dict) and isinstance(b, dict):
            names += [f"{field}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            names.append(field)
    return names


def _changed_libraries(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """"name old -> new" for each library whose version differs (or that a cell starts or stops running)."""
    return [f"{name} {old.get(name, NOT_INSTALLED)} -> {new.get(name, NOT_INSTALLED)}"
            for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]


def _code_reason(provenance: dict[str, Any], cell: Cell) -> str:
    """Why a cell of unchanged parameters gets another key: code, library versions, or (else) the package version."""
    old_code, new_code = provenance.get("code", {}), cell_code(cell)
    parts = [part for part in sorted(new_code) if old_code.get(part) != new_code[part]]
    reasons = ["code changed (" + ", ".join(parts) + ")"] if parts else []
    if "libraries" not in provenance:  # stored before library versions were part of keys: nothing to compare
        reasons.append("library versions not recorded (the cell predates them)")
    else:
        libraries = _changed_libraries(provenance["libraries"], cell_libraries(cell))
        reasons += ["library changed (" + ", ".join(libraries) + ")"] if libraries else []
    return "; ".join(reasons) or "code changed (package version)"


def explain(cells: list[tuple[str, Cell]], store: Store | None) -> list[dict[str, Any]]:
    """One entry per cell: {"key", "cell", "action": "reuse" | "compute", "reason"}.

    Reasons for computing: "new" (nothing stored for this dataset / defense / attack / eps),
    "code changed (attack, defense, harness)", "library changed (torchattacks 3.5.1 -> 3.6.0)" or
    "parameters changed (names)", judged against the most recent stored cell of the same slot, or
    "stored but damaged (why)" for a cell failing its checksum.
    """
    latest: dict[tuple, tuple[Cell, dict[str, Any]]] = {}
    if store is not None:
        for _, stored, info in store.all_cells():
            latest[slot(stored)] = (stored, info)
    plan = []
    for key, cell in cells:
        if store is not None and store.is_done(key):
            problem = store.cell_problem(key)  # a damaged cell is deleted and recomputed by the run
            plan.append({"key": key, "cell": cell, "action": "compute" if problem else "reuse",
                         "reason": f"stored but damaged ({problem})" if problem else "stored"})
            continue
        previous = latest.get(slot(cell))
        if previous is None:
            reason = "new"
        else:
            stored, info = previous
            provenance = info.get("provenance", {})
            if params_digest(stored) != params_digest(cell):
                reason = "parameters changed (" + ", ".join(_changed_params(stored, cell)) + ")"
            else:
                reason = _code_reason(provenance, cell)
        plan.append({"key": key, "cell": cell, "action": "compute", "reason": reason})
    return plan


def format_plan(plan: list[dict[str, Any]]) -> str:
    """A line per cell plus a summary line."""
    lines = []
    for position, entry in enumerate(plan, 1):
        cell = entry["cell"]
        lines.append(f"[{position}/{len(plan)}] {entry['action']:7s} {cell.label()}: {entry['reason']}")
    computed = sum(e["action"] == "compute" for e in plan)
    lines.append(f"dry run: {computed} cell(s) would be computed, {len(plan) - computed} reused; nothing was run")
    return "\n".join(lines) + "\n"
