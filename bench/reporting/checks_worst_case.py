"""Weak-worst-case check: each worst-case column needs a strong attack, EOT with enough draws, consistent curves.

A defense's number is only as good as the strongest attack in its worst case. This check reads
the registry's metadata (`strong`, `ensemble`, `eot`, `minimum_norm`) and the cells' resolved
parameters, never attack names, so a plugin attack registered as strong counts like APGD.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.core.registry import ATTACKS, DEFENSES
from bench.reporting.check_ids import (WEAK_MINIMUM_NORM, WEAK_WORST_CASE, WEAK_WORST_CASE_CE_ONLY,
                                       WEAK_WORST_CASE_EOT_DRAWS, CheckWarning, tagged)
from bench.core.stats import clopper_pearson
from bench.reporting.tables import correctness_columns
from bench.core.types import Cell, Record

__all__ = ["MIN_EOT_DRAWS", "DIVERSE_LOSSES", "check_weak_worst_case"]

# Fewest noise draws per gradient that an EOT attack on a randomized defense needs to count: AutoAttack's
# 'rand' version uses 20, and the saturation curve of APGD-EOT on PixelDP (README) stops falling by 20.
MIN_EOT_DRAWS = 20
# APGD losses that complement CE in a worst case (Croce & Hein 2020: CE alone is fooled by a
# rescaled or saturated softmax; DLR is shift- and scale-invariant, APGD-T targets each class).
DIVERSE_LOSSES = ("dlr", "dlr_targeted")
# A minimum-norm attack's accuracy above a fixed-budget attack's at the same budget by more than
# its own confidence interval means one of the two is weak.
INTERVAL_ALPHA = 0.05

CellRecords = list[tuple[Cell, list[Record]]]


@dataclass(frozen=True)
class _Column:
    """One attack's per-example correctness at one (dataset, defense, norm, eps)."""

    label: str
    strong: bool
    diverse: bool
    eot_draws: int  # 0: not an EOT attack
    minimum_norm: bool
    flags: dict[int, bool]


def _attack_facts(cell: Cell, info: dict[str, Any] | None) -> tuple[bool, bool, bool, bool]:
    """(strong, ensemble, eot, minimum_norm) of the cell's attack: registry metadata, else the stored info."""
    stored = info or {}
    if cell.attack in ATTACKS:
        meta = ATTACKS.info(cell.attack)
        return meta.strong, meta.ensemble, meta.eot, meta.minimum_norm
    return (bool(stored.get("strong", False)), bool(stored.get("ensemble", False)), bool(stored.get("eot", False)),
            bool(stored.get("minimum_norm", False)))


def _randomized(cell: Cell, info: dict[str, Any] | None) -> bool:
    if info is not None and "randomized" in info:
        return bool(info["randomized"])
    return cell.defense in DEFENSES and DEFENSES.info(cell.defense).randomized


def _columns(cells: CellRecords, l_attack: dict[str, list[float]], infos: list[dict | None]):
    """Slots (dataset, defense label, norm, eps > 0) -> their attack columns, and the randomized defenses."""
    slots: dict[tuple, list[_Column]] = defaultdict(list)
    randomized: set[tuple[str, str]] = set()
    for (cell, records), info in zip(cells, infos, strict=True):
        if not records or cell.attack == "none":
            continue
        strong, ensemble, eot, minimum_norm = _attack_facts(cell, info)
        if _randomized(cell, info):
            randomized.add((cell.dataset, cell.defense_label))
        params = cell.attack_params or {}
        diverse = ensemble or params.get("loss") in DIVERSE_LOSSES
        draws = int(params.get("draws", 0) or 0) if eot else 0
        indices = [r.index for r in records]
        for attack, norm, eps, correct in correctness_columns(cell, records, l_attack):
            if norm is None or eps is None or eps <= 0:
                continue  # at budget 0 every attack measures clean accuracy
            label = attack if cell.eps is None else f"{attack}@{eps:g}"
            slots[(cell.dataset, cell.defense_label, norm, float(eps))].append(
                _Column(label, strong, diverse, draws, minimum_norm,
                        dict(zip(indices, (bool(ok) for ok in correct), strict=True))))
    return slots, randomized


def _budgets(found: dict[tuple, list[str]]) -> list[str]:
    """One warning per (dataset, defense, norm): the budgets that lack something, and what ran there."""
    grouped: dict[tuple, list[str]] = defaultdict(list)
    for (dataset, defense, norm, eps), labels in sorted(found.items()):
        grouped[(dataset, defense, norm)].append(f"{eps:g} ({', '.join(labels)})")
    return [f"{dataset}/{defense} {norm} at eps " + "; ".join(parts)
            for (dataset, defense, norm), parts in grouped.items()]


def _fixed_vs_minimum_norm(slot: tuple, columns: list[_Column]) -> list[str]:
    """Minimum-norm columns whose accuracy's interval lies above a fixed-budget attack's accuracy at the same budget."""
    warnings = []
    dataset, defense, norm, eps = slot
    for curve in (c for c in columns if c.minimum_norm):
        for fixed in (c for c in columns if not c.minimum_norm):
            shared = [i for i in curve.flags if i in fixed.flags]
            if not shared:
                continue
            curve_ok = int(sum(curve.flags[i] for i in shared))
            fixed_ok = int(sum(fixed.flags[i] for i in shared))
            low, _ = clopper_pearson(np.array(curve_ok), np.array(len(shared)), INTERVAL_ALPHA)
            if float(low) > fixed_ok / len(shared):
                warnings.append(f"{dataset}/{defense}: the minimum-norm {curve.label} keeps {curve_ok}/{len(shared)} "
                                f"correct at {norm} eps={eps:g}, above its {100 * (1 - INTERVAL_ALPHA):.0f}% interval "
                                f"from the fixed-budget {fixed.label} ({fixed_ok}/{len(shared)}): the minimum-norm "
                                "attack is weak there (more steps, binary-search steps or EOT draws), and its curve "
                                "overstates the defense")
    return warnings


def check_weak_worst_case(cells: CellRecords, l_attack: dict[str, list[float]],
                          infos: list[dict | None] | None = None,
                          min_eot_draws: int = MIN_EOT_DRAWS) -> list[CheckWarning]:
    """Warn where a worst-case column (dataset, defense, norm, eps) is too weak to trust.

    Three signs, each naming the cells: no strong attack (APGD, AutoAttack or an attack registered
    `strong`), or no targeted / DLR variant beside it; for a randomized defense, no strong EOT
    attack with at least `min_eot_draws` draws per gradient; a minimum-norm attack's accuracy
    above a fixed-budget attack's at the same budget by more than its interval.
    """
    infos = list(infos) if infos is not None else [None] * len(cells)
    slots, randomized = _columns(cells, l_attack, infos)
    no_strong: dict[tuple, list[str]] = {}
    no_diverse: dict[tuple, list[str]] = {}
    few_draws: dict[tuple, list[str]] = {}
    inconsistent: list[str] = []
    for slot, columns in slots.items():
        labels = [c.label for c in columns]
        is_randomized = slot[:2] in randomized
        counted = [c for c in columns if c.strong and (not is_randomized or c.eot_draws >= min_eot_draws)]
        if is_randomized and not any(c.eot_draws >= min_eot_draws for c in columns):
            few_draws[slot] = labels
        elif not counted:
            no_strong[slot] = labels
        elif not any(c.diverse for c in counted):
            no_diverse[slot] = labels
        inconsistent += _fixed_vs_minimum_norm(slot, columns)
    warnings = tagged(WEAK_WORST_CASE, [
        f"weak worst case: {where}: no strong attack (APGD, AutoAttack or an attack registered strong); "
        "add APGD-CE and APGD-T (loss = 'dlr_targeted') at these budgets" for where in _budgets(no_strong)])
    warnings += tagged(WEAK_WORST_CASE_CE_ONLY, [
        f"weak worst case: {where}: APGD with the CE loss only; add a targeted or DLR variant "
        "(loss = 'dlr_targeted' or 'dlr')" for where in _budgets(no_diverse)])
    warnings += tagged(WEAK_WORST_CASE_EOT_DRAWS, [
        f"weak worst case: {where}: a randomized defense without a strong EOT attack of at least "
        f"{min_eot_draws} draws per gradient; its accuracy is overstated (use apgd_*_eot with "
        f"draws >= {min_eot_draws})" for where in _budgets(few_draws)])
    return warnings + tagged(WEAK_MINIMUM_NORM, [f"weak worst case: {w}" for w in inconsistent])
