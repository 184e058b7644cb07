"""The gradient-masking checks: a gradient-free attack beating the white-box ones, and accuracy left at a huge eps."""
from __future__ import annotations

from bench.reporting.checks import huge_eps, run_checks
from bench.core.types import Cell, Record

L_ATTACK = {"l2": [0.0, 1.0], "linf": [0.0, 0.1]}


def records(correct_after: list[bool]) -> list[Record]:
    return [Record(index=i, label=0, clean_pred=0, adv_pred=0 if ok else 1, norm=0.1, radius=None, seconds=0.0,
                   forward_passes=1) for i, ok in enumerate(correct_after)]


def cell(attack: str, eps: float, defense: str = "madry", norm: str = "linf", label: str = "") -> Cell:
    return Cell(dataset="mnist5k", defense=defense, attack=attack, norm=norm, eps=eps, attack_label=label)


def test_square_beating_every_white_box_attack_names_the_cells():
    white = [True] * 6 + [False] * 4
    cells = [(cell("pgd_linf", 0.1), records(white)), (cell("apgd_linf", 0.1, label="apgd_t"), records(white)),
             (cell("square_linf@torchattacks", 0.1), records([False] * 10))]
    warnings = [w for w in run_checks(cells, L_ATTACK) if "gradient-free" in w]
    assert len(warnings) == 1
    assert "square_linf@torchattacks@0.1 broke 6/10" in warnings[0]
    assert "pgd_linf@0.1" in warnings[0] and "apgd_t@0.1" in warnings[0] and "mnist5k/madry" in warnings[0]


def test_square_no_better_than_the_white_box_worst_case_is_quiet():
    # Square breaks examples 0-2, PGD 0-1 and APGD 2: the per-example worst case already has them all.
    cells = [(cell("pgd_linf", 0.1), records([False, False, True, True])),
             (cell("apgd_linf", 0.1), records([True, True, False, True])),
             (cell("square_linf@torchattacks", 0.1), records([False, False, False, True]))]
    assert not [w for w in run_checks(cells, L_ATTACK) if "gradient-free" in w]


def test_one_example_is_within_the_margin():
    cells = [(cell("pgd_linf", 0.1), records([True] * 4)),
             (cell("square_linf@torchattacks", 0.1), records([False, True, True, True]))]
    assert not [w for w in run_checks(cells, L_ATTACK) if "gradient-free" in w]


def test_accuracy_left_at_a_huge_eps_is_flagged_for_any_defense():
    assert huge_eps("mnist5k", "linf") == 0.5 and huge_eps("mnist5k", "l2") == 14.0
    kept = [(cell("apgd_linf_eot", 0.5, defense="pixeldp"), records([True] * 3 + [False] * 7))]
    warnings = [w for w in run_checks(kept, L_ATTACK) if "constant image" in w]
    assert len(warnings) == 1 and "mnist5k/pixeldp/apgd_linf_eot@0.5: 3/10" in warnings[0]
    broken = [(cell("apgd_linf_eot", 0.5, defense="pixeldp"), records([True] + [False] * 9)),
              (cell("apgd_linf", 0.3, defense="madry"), records([True] * 10))]  # 0.3 is not huge
    assert not [w for w in run_checks(broken, L_ATTACK) if "constant image" in w]
