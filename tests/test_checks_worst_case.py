"""The weak-worst-case check: fires on the mnist-cpu evidence that overstated PixelDP, silent on a strong profile."""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import pytest

from bench.reporting.baseline import load_export
from bench.reporting.checks import run_checks
from bench.reporting.checks_worst_case import MIN_EOT_DRAWS, check_weak_worst_case
from bench.profile.config import load_profile, shipped_profiles
from bench.reporting.report import run_data
from bench.core.types import Cell, Record

ROOT = Path(__file__).resolve().parents[1]
# The attack cells of results/baselines/mnist-cpu as committed before issue 25 (f64aeb0): CW-L2-EOT with
# 2 binary-search steps and 5 draws was PixelDP's only L2 attack, and no model met APGD in L2.
OLD_MNIST_CPU = ROOT / "tests" / "golden" / "mnist_cpu_before_issue25.json.gz"
NEW_MNIST_CPU = ROOT / "results" / "baselines" / "mnist-cpu" / "baseline.json"
L_ATTACK = {"l2": [0.0, 1.0, 2.0], "linf": [0.0, 0.1]}


def _warnings_of_export(path: Path) -> list[str]:
    store, run_id = load_export(path)
    run = run_data(store, run_id)
    return run_checks(run.cells, run.settings["l_attack"], run.infos)


def test_fires_on_the_old_mnist_cpu_run(tmp_path):
    export = tmp_path / "old.json"
    export.write_text(gzip.decompress(OLD_MNIST_CPU.read_bytes()).decode())
    warnings = [w for w in _warnings_of_export(export) if w.startswith("weak worst case")]
    text = "\n".join(warnings)
    # PixelDP's L2 column had only CW-L2-EOT (5 draws); its L-inf columns had EOT with 10 draws.
    assert "mnist/pixeldp_L0.1 l2 at eps 0.25 (cw_l2_eot)" in text
    assert "mnist/pixeldp_L0.1 l2" in text and "3 (cw_l2_eot)" in text
    assert "mnist/pixeldp_L0.1 linf at eps 0.1 (pgd_linf_eot@0.1, apgd_linf_eot@0.1)" in text
    # The deterministic models had no APGD in L2, and APGD-CE without a targeted variant in L-inf.
    for defense in ("undefended", "madry", "wong_kolter"):
        assert f"mnist/{defense} l2 at eps 0.25 (cw_l2)" in text
        assert any(f"mnist/{defense} linf at eps 0.1 (pgd_linf@0.1, apgd_ce_linf@0.1)" in w and "CE loss only" in w
                   for w in warnings)
        assert any(f"mnist/{defense} linf" in w and "0.2 (pgd_linf@0.2)" in w and "no strong attack" in w
                   for w in warnings)


@pytest.mark.skipif(not NEW_MNIST_CPU.exists(), reason="no committed mnist-cpu baseline")
def test_silent_on_the_committed_mnist_cpu_run():
    assert [w for w in _warnings_of_export(NEW_MNIST_CPU) if w.startswith("weak worst case")] == []


def _records(flags: list[bool], norms: list[float] | None = None) -> list[Record]:
    return [Record(index=i, label=0, clean_pred=0, adv_pred=0 if ok else 1, norm=norms[i] if norms else 0.1,
                   radius=None, seconds=0.0, forward_passes=1) for i, ok in enumerate(flags)]


def _cell(attack: str, eps: float | None, *, defense="undefended", norm="linf", **params) -> Cell:
    return Cell(dataset="mnist5k", defense=defense, attack=attack, norm=norm, eps=eps, attack_params=params)


def test_strong_pair_is_silent_and_each_missing_piece_fires():
    ok = [True, False, True, False]
    strong = [(_cell("apgd_linf", 0.1, loss="ce"), _records(ok)),
              (_cell("apgd_linf", 0.1, loss="dlr_targeted"), _records(ok))]
    assert check_weak_worst_case(strong, L_ATTACK) == []
    only_ce = check_weak_worst_case(strong[:1], L_ATTACK)
    assert len(only_ce) == 1 and "CE loss only" in only_ce[0]
    only_pgd = check_weak_worst_case([(_cell("pgd_linf", 0.1), _records(ok))], L_ATTACK)
    assert len(only_pgd) == 1 and "no strong attack" in only_pgd[0] and "pgd_linf@0.1" in only_pgd[0]


def test_randomized_defense_needs_enough_eot_draws():
    def eot(draws: int, loss: str) -> tuple[Cell, list[Record]]:
        return (_cell("apgd_linf_eot", 0.1, defense="pixeldp", loss=loss, draws=draws), _records([True, False]))

    assert check_weak_worst_case([eot(MIN_EOT_DRAWS, "ce"), eot(MIN_EOT_DRAWS, "dlr")], L_ATTACK) == []
    few = check_weak_worst_case([eot(MIN_EOT_DRAWS - 1, "ce"), eot(MIN_EOT_DRAWS - 1, "dlr")], L_ATTACK)
    assert len(few) == 1 and f"at least {MIN_EOT_DRAWS} draws" in few[0]
    # A deterministic APGD (no EOT) does not count against noise, however many steps it takes.
    plain = check_weak_worst_case([(_cell("apgd_linf", 0.1, defense="pixeldp", loss="ce"), _records([True]))],
                                  L_ATTACK)
    assert len(plain) == 1 and "randomized defense" in plain[0]


def test_minimum_norm_curve_above_fixed_budget_interval_fires():
    n = 100
    # CW finds adversarials of norm 3 for half the examples: at L2 = 2 half stay correct under CW,
    # while APGD at 2 breaks 80 of the 100.
    curve = (_cell("cw_l2", None, norm="l2"), _records([True] * n, norms=[3.0] * (n // 2) + [1.0] * (n // 2)))
    apgd = [(_cell("apgd_l2", 2.0, norm="l2", loss=loss), _records([i >= 80 for i in range(n)]))
            for loss in ("ce", "dlr_targeted")]
    apgd_at_1 = [(_cell("apgd_l2", 1.0, norm="l2", loss=loss), _records([True] * n)) for loss in ("ce", "dlr_targeted")]
    warnings = check_weak_worst_case([curve, *apgd, *apgd_at_1], L_ATTACK)
    assert len(warnings) == 2 and all("minimum-norm cw_l2 keeps" in w and "eps=2" in w for w in warnings)
    assert "50/100" in warnings[0]
    # Within the interval (CW 52 correct, APGD 50): no warning.
    close = (_cell("cw_l2", None, norm="l2"), _records([True] * n, norms=[3.0] * 52 + [1.5] * 48))
    level = [(_cell("apgd_l2", 2.0, norm="l2", loss=loss), _records([i < 50 for i in range(n)]))
             for loss in ("ce", "dlr_targeted")]
    assert check_weak_worst_case([close, *level, *apgd_at_1], L_ATTACK) == []


@pytest.mark.parametrize("name", shipped_profiles())
def test_every_shipped_profile_has_a_strong_worst_case(name):
    """Every column a shipped profile reports has APGD-CE and a targeted / DLR variant, with EOT of enough
    draws against randomized defenses (records all correct: only the profile's structure is judged)."""
    profile = load_profile(name)
    cells = []
    for cell in profile.cells:
        if cell.attack == "none":
            continue
        norms = [math.inf] if cell.eps is None else [0.0]
        cells.append((cell, _records([True], norms=norms)))
    assert check_weak_worst_case(cells, profile.l_attack) == []
