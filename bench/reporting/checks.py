"""Sanity checks over a run's records (in the spirit of AutoAttack's flags): warnings, never errors."""
from __future__ import annotations

import math
from collections import defaultdict
from itertools import pairwise
from typing import Any

import numpy as np

from bench.reporting.checks_worst_case import check_weak_worst_case
from bench.core.defense import certified_norm
from bench.core.registry import ATTACKS, DATASETS, DEFENSES
from bench.reporting.tables import correctness_columns
from bench.core.types import NORMS, Cell, Record, cell_label
from bench.reporting.check_ids import (CERTIFIED_ABOVE_ATTACK, GRADIENT_FREE_WINS, GRADIENT_MASKING,
                                       HUGE_EPS_SURVIVORS, RANDOMIZED_WITHOUT_EOT, RISES_WITH_EPS,
                                       SATURATED_SOFTMAX, UNBOUNDED_ATTACK_FAILS, UNDEFENDED_NOT_BROKEN,
                                       CheckWarning, raises)

# An undefended model should be (almost) fully broken at these sizes (MNIST-scale budgets).
LARGE_EPS = {"linf": 0.3, "l2": 3.0}
BROKEN_ACCURACY = 0.05
# A minimum-norm attack has no budget: failing on more than this fraction hints at gradient masking.
UNBOUNDED_FAILURES = 0.10
# Budgets that reach the constant mid-grey image from any input (half the pixel range per pixel; for
# L2 scaled by sqrt(d)): any correct attack must reach ~0% there, whatever the defense.
HUGE_LINF = 0.5
HUGE_L2_PER_SQRT_DIM = 0.5
HUGE_EPS_ACCURACY = 0.10
# A gradient-free attack beating the white-box worst case by more than this (examples, and fraction
# of n) means the white-box gradients are misleading (Carlini et al. 2019, "On evaluating...").
GRADIENT_FREE_MARGIN = 1
GRADIENT_FREE_FRACTION = 0.01
ZERO_GRADIENT_FRACTION = 0.10

CellRecords = list[tuple[Cell, list[Record]]]


def _flag(cell: Cell, info: dict[str, Any] | None, name: str) -> bool:
    """A registration flag of the cell's defense or attack, from the stored info or the registries."""
    if info is not None and name in info:
        return bool(info[name])
    if name == "randomized" and cell.defense in DEFENSES:
        return DEFENSES.info(cell.defense).randomized
    if cell.attack in ATTACKS:
        attack = ATTACKS.info(cell.attack)
        return {"eot": attack.eot, "minimum_norm": attack.minimum_norm, "gradient_free": attack.gradient_free}.get(
            name, False)
    return False


def _certified_norm(cell: Cell) -> str | None:
    """The norm of a certified defense's radii when it is one the attacks use (l1, l2, linf), else None."""
    norm = certified_norm(cell.defense, cell.defense_params)
    return norm if norm in NORMS else None


@raises(RISES_WITH_EPS)
def check_monotone(cells: CellRecords, l_attack: dict[str, list[float]]) -> list[str]:
    """Accuracy under a fixed-size attack must not grow with eps (beyond one example or 1%)."""
    curves: dict[tuple, list[tuple[float, int, int]]] = defaultdict(list)
    for cell, records in cells:
        if records and cell.attack != "none" and cell.eps is not None:
            for attack, norm, eps, correct in correctness_columns(cell, records, l_attack):
                curves[(cell.dataset, cell.defense_label, attack, norm)].append((eps, int(correct.sum()), len(correct)))
    warnings = []
    for (dataset, defense, attack, norm), points in curves.items():
        points.sort()
        for (eps_a, ok_a, n_a), (eps_b, ok_b, n_b) in pairwise(points):
            if ok_b - ok_a > max(1.0, 0.01 * n_b):
                warnings.append(f"{cell_label(dataset, defense, attack)}: accuracy rises with eps ({norm} {eps_a:g}: "
                                f"{ok_a}/{n_a} -> {eps_b:g}: {ok_b}/{n_b}); the attack is unreliable "
                                "(too few steps, a bad step size, or gradient masking)")
    return warnings


@raises(UNDEFENDED_NOT_BROKEN)
def check_undefended_broken(cells: CellRecords, l_attack: dict[str, list[float]]) -> list[str]:
    """An undefended model must reach ~0% under its strongest fixed-size attack at a large eps."""
    best: dict[tuple, tuple[float, float, int, int, str]] = {}
    for cell, records in cells:
        if not records or cell.defense != "undefended" or cell.attack == "none" or cell.eps is None:
            continue
        if cell.norm not in LARGE_EPS or cell.eps < LARGE_EPS[cell.norm]:
            continue
        for attack, norm, eps, correct in correctness_columns(cell, records, l_attack):
            key = (cell.dataset, cell.defense_label, norm)
            accuracy = float(correct.mean())
            if key not in best or accuracy < best[key][1]:
                best[key] = (eps, accuracy, int(correct.sum()), len(correct), attack)
    return [f"{dataset}/{defense}: the undefended model keeps {ok}/{n} correct under {attack} at {norm} "
            f"eps={eps:g}; the attacks look too weak (more steps or restarts)"
            for (dataset, defense, norm), (eps, accuracy, ok, n, attack) in best.items() if accuracy > BROKEN_ACCURACY]


@raises(UNBOUNDED_ATTACK_FAILS)
def check_unbounded_failures(cells: CellRecords, infos: list[dict | None]) -> list[str]:
    """A minimum-norm attack has no budget, so its failures on correctly classified points suggest masking."""
    warnings = []
    for (cell, records), info in zip(cells, infos, strict=True):
        if not records or cell.attack == "none" or not _flag(cell, info, "minimum_norm"):
            continue
        correct = [r for r in records if r.clean_pred == r.label]
        failed = sum(1 for r in correct if math.isinf(r.norm))
        if correct and failed > UNBOUNDED_FAILURES * len(correct):
            warnings.append(f"{cell.label()}: the unbounded attack failed on {failed}/{len(correct)} correctly "
                            "classified examples; possible gradient masking or too few iterations / binary-search "
                            "steps")
    return warnings


def check_zero_gradients(cells: CellRecords, infos: list[dict | None]) -> list[CheckWarning]:
    """Flag defenses whose input gradients vanish on many examples (stored by the runner per cell)."""
    seen: dict[tuple, dict[str, float]] = {}
    for (cell, records), info in zip(cells, infos, strict=True):
        stats = (info or {}).get("zero_gradients")
        if records and stats:
            seen.setdefault((cell.dataset, cell.defense_label), stats)
    warnings = []
    for (dataset, defense), stats in seen.items():
        if stats.get("margin", 0.0) > ZERO_GRADIENT_FRACTION:
            warnings.append(CheckWarning(
                f"{dataset}/{defense}: {100 * stats['margin']:.0f}% of examples have ~zero logit-margin "
                "input gradients: gradient masking; gradient-based results are not trustworthy "
                "(try a gradient-free attack)", GRADIENT_MASKING))
        elif stats.get("ce", 0.0) > ZERO_GRADIENT_FRACTION:
            warnings.append(CheckWarning(
                f"{dataset}/{defense}: {100 * stats['ce']:.0f}% of examples have ~zero cross-entropy "
                "input gradients (saturated softmax); prefer the CW margin loss (loss = 'cw')", SATURATED_SOFTMAX))
    return warnings


@raises(RANDOMIZED_WITHOUT_EOT)
def check_randomized_without_eot(cells: CellRecords, infos: list[dict | None]) -> list[str]:
    """A randomized defense attacked without EOT gets single-draw gradients: its accuracy is overestimated."""
    warnings = []
    for (cell, records), info in zip(cells, infos, strict=True):
        if not records or cell.attack == "none":
            continue
        if _flag(cell, info, "randomized") and not _flag(cell, info, "eot"):
            warnings.append(f"{cell.label()}: a randomized defense attacked without EOT; use an *_eot attack for a "
                            "fair number")
    return warnings


@raises(CERTIFIED_ABOVE_ATTACK)
def check_certified_vs_attack(cells: CellRecords, l_attack: dict[str, list[float]]) -> list[str]:
    """Certified accuracy at radius T can never exceed accuracy under attack at L_attack = T (same norm)."""
    certified: dict[tuple, tuple[str, dict[int, tuple[bool, float]]]] = {}
    for cell, records in cells:
        norm = _certified_norm(cell)
        if cell.attack == "none" and records and norm and any(r.radius is not None for r in records):
            certified[(cell.dataset, cell.defense_label)] = (norm, {
                r.index: (r.clean_pred == r.label, r.radius or 0.0) for r in records})
    warnings = []
    for cell, records in cells:
        slot = certified.get((cell.dataset, cell.defense_label))
        if not records or cell.attack == "none" or slot is None or slot[0] != cell.norm:
            continue
        per_example = slot[1]
        indices = [r.index for r in records]
        for _, norm, eps, correct in correctness_columns(cell, records, l_attack):
            if eps <= 0:
                continue  # at 0 both are clean accuracies, from different noise draws
            cert = np.array([per_example.get(i, (False, 0.0))[0] and per_example.get(i, (False, 0.0))[1] >= eps
                             for i in indices])
            if cert.sum() > correct.sum():
                broken = int((cert & ~correct).sum())
                warnings.append(f"{cell.label()}: certified accuracy at {norm} radius {eps:g} "
                                f"({int(cert.sum())}/{len(cert)}) exceeds accuracy under attack "
                                f"({int(correct.sum())}/{len(correct)}); {broken} certified example(s) were broken: "
                                "the certificate or the attack's judging is wrong")
    return warnings


def huge_eps(dataset: str, norm: str | None) -> float:
    """The smallest budget from which every image of `dataset` can reach the constant 0.5 image (L2 unless
    `norm` is "linf" or "l1")."""
    if norm == "linf":
        return HUGE_LINF
    dims = math.prod(DATASETS.get(dataset).shape) if dataset in DATASETS else 784
    if norm == "l1":
        return HUGE_LINF * dims  # half the pixel range on every pixel
    return HUGE_L2_PER_SQRT_DIM * math.sqrt(dims)


@raises(HUGE_EPS_SURVIVORS)
def check_huge_eps(cells: CellRecords, l_attack: dict[str, list[float]]) -> list[str]:
    """At a budget that reaches a constant image from every input, accuracy under attack must be ~0 (any defense)."""
    warnings = []
    for cell, records in cells:
        if not records or cell.attack == "none" or cell.eps is None or cell.eps < huge_eps(cell.dataset, cell.norm):
            continue
        for _, norm, eps, correct in correctness_columns(cell, records, l_attack):
            if correct.mean() > HUGE_EPS_ACCURACY:
                warnings.append(f"{cell.label()}: {int(correct.sum())}/{len(correct)} stay correct at {norm} "
                                f"eps={eps:g}, a budget that reaches a constant image from every input; the attack is "
                                "failing (gradient masking, too few steps, or no EOT against noise)")
    return warnings


@raises(GRADIENT_FREE_WINS)
def check_gradient_free_wins(cells: CellRecords, l_attack: dict[str, list[float]],
                             infos: list[dict | None]) -> list[str]:
    """A gradient-free attack (e.g. Square) that breaks examples every white-box attack missed signals masking."""
    white: dict[tuple, tuple[list[str], dict[int, bool]]] = {}
    free: list[tuple[tuple, str, dict[int, bool]]] = []
    for (cell, records), info in zip(cells, infos, strict=True):
        if not records or cell.attack == "none":
            continue
        gradient_free = _flag(cell, info, "gradient_free")
        indices = [r.index for r in records]
        for attack, norm, eps, correct in correctness_columns(cell, records, l_attack):
            slot = (cell.dataset, cell.defense_label, norm, float(eps))
            label = attack if cell.eps is None else f"{attack}@{eps:g}"
            flags = dict(zip(indices, (bool(ok) for ok in correct), strict=True))
            if gradient_free:
                free.append((slot, label, flags))
                continue
            names, worst = white.setdefault(slot, ([], {}))
            names.append(label)
            for index, ok in flags.items():
                worst[index] = worst.get(index, True) and ok
    warnings = []
    for slot, label, flags in free:
        if slot not in white:
            continue
        names, worst = white[slot]
        shared = [i for i in flags if i in worst]
        beaten = sum(1 for i in shared if worst[i] and not flags[i])
        if beaten > max(GRADIENT_FREE_MARGIN, GRADIENT_FREE_FRACTION * len(shared)):
            dataset, defense, norm, eps = slot
            warnings.append(f"{dataset}/{defense}: the gradient-free {label} broke {beaten}/{len(shared)} examples "
                            f"that every white-box attack missed ({', '.join(names)}) at {norm} eps={eps:g}; "
                            "gradient masking: the white-box numbers overstate robustness")
    return warnings


def run_checks(cells: CellRecords, l_attack: dict[str, list[float]],
               infos: list[dict | None] | None = None) -> list[CheckWarning]:
    """Every sanity check over a run's (cell, records) pairs; `infos` are the cells' stored infos, in order.

    Each warning is its text, with its kind's ID (bench.reporting.check_ids) in `.check`.
    """
    infos = list(infos) if infos is not None else [None] * len(cells)
    return (check_monotone(cells, l_attack) + check_undefended_broken(cells, l_attack)
            + check_unbounded_failures(cells, infos) + check_zero_gradients(cells, infos)
            + check_randomized_without_eot(cells, infos) + check_certified_vs_attack(cells, l_attack)
            + check_huge_eps(cells, l_attack) + check_gradient_free_wins(cells, l_attack, infos)
            + check_weak_worst_case(cells, l_attack, infos))
