"""Every kind of sanity-check warning carries a stable ID, and docs/checks.md has one section per ID."""
from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import pytest

from bench.core.types import Cell, Record
from bench.reporting import check_ids
from bench.reporting.check_ids import CHECK_IDS, CHECKS_DOC, INCOMPLETE_RUN, CheckWarning
from bench.reporting.checks import run_checks

ROOT = Path(__file__).resolve().parents[1]
L_ATTACK = {"l2": [0.0, 1.0, 2.0], "linf": [0.0, 0.1]}


def _records(flags: list[bool], norms: list[float] | None = None, radius: float | None = None) -> list[Record]:
    return [Record(index=i, label=0, clean_pred=0, adv_pred=0 if ok else 1, norm=norms[i] if norms else 0.1,
                   radius=radius, seconds=0.0, forward_passes=1) for i, ok in enumerate(flags)]


def _cell(attack: str, eps: float | None, defense: str = "undefended", norm: str | None = "linf",
          defense_params: dict | None = None, **params) -> Cell:
    return Cell(dataset="mnist5k", defense=defense, attack=attack, norm=None if attack == "none" else norm, eps=eps,
                defense_params=defense_params or {}, attack_params=params)


def _apgd_pair(eps: float, norm: str, flags: list[bool]) -> list[tuple[Cell, list[Record]]]:
    return [(_cell(f"apgd_{norm}", eps, norm=norm, loss=loss), _records(flags)) for loss in ("ce", "dlr_targeted")]


# ID -> (cells, infos or None): a small run that raises (at least) that kind of warning.
SCENARIOS = {
    "accuracy-rises-with-eps": ([(_cell("pgd_linf", 0.1), _records([False] * 4)),
                                 (_cell("pgd_linf", 0.2), _records([True] * 4))], None),
    "undefended-not-broken": ([(_cell("pgd_linf", 0.3), _records([True, True, False, False]))], None),
    "unbounded-attack-fails": ([(_cell("cw_l2", None, norm="l2"), _records([True] * 4, norms=[math.inf] * 4))],
                               [{"minimum_norm": True}]),
    "gradient-masking": ([(_cell("pgd_linf", 0.1), _records([False] * 4))],
                         [{"zero_gradients": {"ce": 0.0, "margin": 0.5}}]),
    "saturated-softmax": ([(_cell("pgd_linf", 0.1), _records([False] * 4))],
                          [{"zero_gradients": {"ce": 0.5, "margin": 0.0}}]),
    "randomized-without-eot": ([(_cell("pgd_linf", 0.05, defense="x"), _records([False] * 4))],
                               [{"randomized": True, "eot": False, "minimum_norm": False}]),
    "certified-above-attack": ([(_cell("none", None, "wong_kolter", defense_params={"norm": "linf"}),
                                 _records([True] * 4, radius=0.2)),
                                (_cell("pgd_linf", 0.1, "wong_kolter", defense_params={"norm": "linf"}),
                                 _records([False] * 4))], None),
    "huge-eps-survivors": ([(_cell("apgd_linf_eot", 0.5, "pixeldp"), _records([True] * 3 + [False] * 7))], None),
    "gradient-free-wins": ([(_cell("pgd_linf", 0.1, "madry"), _records([True] * 6 + [False] * 4)),
                            (_cell("square_linf@torchattacks", 0.1, "madry"), _records([False] * 10))], None),
    "weak-worst-case": ([(_cell("pgd_linf", 0.1), _records([True, False]))], None),
    "weak-worst-case-ce-only": ([(_cell("apgd_linf", 0.1, loss="ce"), _records([True, False]))], None),
    "weak-worst-case-eot-draws": ([(_cell("apgd_linf_eot", 0.1, "pixeldp", loss=loss, draws=5), _records([True]))
                                   for loss in ("ce", "dlr")], None),
    "weak-minimum-norm": ([(_cell("cw_l2", None, norm="l2"), _records([True] * 100, norms=[3.0] * 50 + [1.0] * 50)),
                           *_apgd_pair(2.0, "l2", [i >= 80 for i in range(100)]),
                           *_apgd_pair(1.0, "l2", [True] * 100)], None),
}


def test_ids_are_unique_slugs_and_each_has_a_constant():
    assert len(set(CHECK_IDS)) == len(CHECK_IDS)
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", check) for check in CHECK_IDS)
    constants = {value for name, value in vars(check_ids).items() if name.isupper() and isinstance(value, str)}
    assert constants - {CHECKS_DOC} == set(CHECK_IDS)


def test_docs_have_one_section_per_id_in_order():
    text = (ROOT / CHECKS_DOC).read_text()
    sections = re.findall(r"^## (\S+)$", text, flags=re.MULTILINE)
    assert sections == list(CHECK_IDS)
    for check in CHECK_IDS:  # the overview table links every section
        assert f"](#{check})" in text
        body = text.split(f"## {check}\n", 1)[1].split("\n## ", 1)[0]
        assert "**Raised when**" in body and "**What to do.**" in body, check


@pytest.mark.parametrize("check", sorted(SCENARIOS))
def test_every_kind_of_warning_carries_its_id(check):
    cells, infos = SCENARIOS[check]
    warnings = run_checks(cells, L_ATTACK, infos)
    assert all(isinstance(w, CheckWarning) and w.check in CHECK_IDS for w in warnings), warnings
    assert check in {w.check for w in warnings}, warnings


def test_scenarios_cover_every_id_the_checks_raise():
    assert set(SCENARIOS) == set(CHECK_IDS) - {INCOMPLETE_RUN}  # the report raises that one (test_html_report)


def test_a_warning_is_its_text_and_survives_pickling():
    warning = CheckWarning("mnist/x: something", "gradient-masking")
    assert warning == "mnist/x: something" and f"WARNING: {warning}" == "WARNING: mnist/x: something"
    copy = pickle.loads(pickle.dumps(warning))
    assert copy == warning and copy.check == "gradient-masking"
