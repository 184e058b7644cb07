"""EOT saturation (issue 25): APGD-EOT accuracy against PixelDP and randomized smoothing over draws x steps.

Runs tests/benchmarks/profiles/eot-saturation.toml on real MNIST ($PIXELDP_BENCH_REAL_MNIST, the
data root; skipped without it) and prints the curve. The mnist-cpu setting (20 draws, 50 steps) is
saturated when doubling either (40 draws, or 100 and 200 steps) lowers accuracy by no more than the
noise of two fresh judgements: asserted as a one-sided paired sign test on the shared examples.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from scipy.stats import binomtest

from bench.cli.commands import main
from bench.reporting.report import run_data
from bench.execution.store import Store
from bench.reporting.tables import correctness_columns

PROFILE = Path(__file__).parent / "profiles" / "eot-saturation.toml"
SETTING = "apgd_eot_d20_s50"
STRONGER = ("apgd_eot_d40_s50", "apgd_eot_d20_s100", "apgd_eot_d20_s200")


def saturation_curve(results: Path) -> dict[str, dict[str, dict[int, bool]]]:
    """defense label -> attack label -> {example index: correct} of the latest run in `results`."""
    store = Store(results / "store.sqlite", readonly=True)
    run_id = store.runs()[-1]
    curve: dict[str, dict[str, dict[int, bool]]] = {}
    for cell, records in run_data(store, run_id, infos=False).cells:
        if cell.attack == "none" or not records:
            continue
        for attack, _, _, correct in correctness_columns(cell, records, {}):
            curve.setdefault(cell.defense_label, {})[attack] = dict(
                zip((r.index for r in records), (bool(ok) for ok in correct), strict=True))
    return curve


@pytest.mark.skipif(not os.environ.get("PIXELDP_BENCH_REAL_MNIST"), reason="needs real MNIST")
def test_apgd_eot_saturates_at_the_mnist_cpu_setting(benchmark, tmp_path):
    if benchmark.disabled:
        pytest.skip("a benchmark: run with tox -e bench")
    results = tmp_path / "results"
    args = ["run", str(PROFILE), "--results", str(results), "--data-root", os.environ["PIXELDP_BENCH_REAL_MNIST"],
            "--quiet"]
    assert benchmark.pedantic(lambda: main(args), rounds=1, iterations=1) == 0
    curve = saturation_curve(results)
    for defense, attacks in curve.items():
        print(f"\n{defense}: " + ", ".join(f"{name} {sum(flags.values())}/{len(flags)}"
                                            for name, flags in sorted(attacks.items())))
        base = attacks[SETTING]
        for name in STRONGER:
            # Examples the stronger attack breaks that the setting missed, against the reverse.
            gained = sum(1 for i, ok in base.items() if ok and not attacks[name][i])
            lost = sum(1 for i, ok in base.items() if not ok and attacks[name][i])
            if gained + lost:
                assert binomtest(gained, gained + lost, alternative="greater").pvalue > 0.05, (defense, name)
        benchmark.extra_info[defense] = {name: sum(flags.values()) for name, flags in attacks.items()}
