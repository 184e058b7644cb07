"""bench.reporting.checks flags the classic evaluation mistakes from records alone."""
from __future__ import annotations

import math

from bench.reporting.checks import run_checks as all_checks
from bench.core.types import Cell, Record

L_ATTACK = {"l2": [0.0, 1.0], "linf": [0.0, 0.1]}


def run_checks(cells, l_attack, infos=None) -> list[str]:
    """The checks other than the weak-worst-case one (tests/test_checks_worst_case.py covers it)."""
    return [w for w in all_checks(cells, l_attack, infos) if not w.startswith("weak worst case")]


def records(correct_after: list[bool], norms=None, radius=None) -> list[Record]:
    return [Record(index=i, label=0, clean_pred=0, adv_pred=0 if ok else 1,
                   norm=(norms[i] if norms else 0.1), radius=radius, seconds=0.0, forward_passes=1)
            for i, ok in enumerate(correct_after)]


def cell(attack="pgd_linf", eps=0.1, defense="undefended", norm="linf", params=None) -> Cell:
    return Cell(dataset="mnist5k", defense=defense, attack=attack, norm=None if attack == "none" else norm,
                eps=eps, defense_params=params or {})


def test_clean_run_has_no_warnings():
    cells = [(cell(eps=0.1), records([True, False, False, False])), (cell(eps=0.3), records([False] * 4))]
    assert run_checks(cells, L_ATTACK) == []


def test_accuracy_rising_with_eps_is_flagged():
    cells = [(cell(eps=0.1), records([False] * 4)), (cell(eps=0.2), records([True] * 4))]
    assert any("rises with eps" in w for w in run_checks(cells, L_ATTACK))


def test_undefended_not_broken_at_large_eps_is_flagged():
    cells = [(cell(eps=0.3), records([True, True, False, False]))]
    assert any("undefended model keeps" in w for w in run_checks(cells, L_ATTACK))


def test_randomized_defense_without_eot_is_flagged():
    cells = [(cell(eps=0.05, defense="x"), records([False] * 4))]
    infos = [{"randomized": True, "eot": False, "minimum_norm": False}]
    assert any("without EOT" in w for w in run_checks(cells, L_ATTACK, infos))
    infos = [{"randomized": True, "eot": True, "minimum_norm": False}]
    assert run_checks(cells, L_ATTACK, infos) == []


def test_unbounded_failures_and_zero_gradients_are_flagged():
    cells = [(cell(attack="cw_l2", eps=None, norm="l2"), records([True] * 4, norms=[math.inf] * 4))]
    infos = [{"minimum_norm": True, "zero_gradients": {"ce": 0.0, "margin": 0.5}}]
    warnings = run_checks(cells, L_ATTACK, infos)
    assert any("unbounded attack failed on 4/4" in w for w in warnings)
    assert any("gradient masking" in w and "logit-margin" in w for w in warnings)


def test_certified_accuracy_above_attack_accuracy_is_flagged():
    # The certified norm comes from the defense's `norm` parameter (Wong-Kolter's radii are L-inf).
    clean = (cell(attack="none", eps=None, defense="wong_kolter", params={"norm": "linf"}),
             records([True] * 4, radius=0.2))
    attacked = (cell(eps=0.1, defense="wong_kolter", params={"norm": "linf"}), records([False] * 4))
    warnings = run_checks([clean, attacked], L_ATTACK)
    assert any("certified accuracy" in w and "4 certified example(s) were broken" in w for w in warnings)
