"""cw_l2 defaults vs a long 9 x 1000-step reference run on the smoke-like CNN: median-norm ratio and time."""
from __future__ import annotations

import math
import time

import torch

from attacks.cw import PAPER, carlini_wagner_l2

EXAMPLES = 50


def test_cw_defaults_vs_long_reference(benchmark, trained_cnn, mnist_test):
    x, y = mnist_test[0][:EXAMPLES + 5], mnist_test[1][:EXAMPLES + 5]
    with torch.no_grad():
        correct = trained_cnn(x).argmax(1) == y
    x, y = x[correct][:EXAMPLES], y[correct][:EXAMPLES]
    results = {}
    for name, params in (("defaults", {}), ("paper", PAPER), ("reference 9x1000", {"steps": 1000, "lr": 1e-2})):
        began = time.perf_counter()
        _, norms = carlini_wagner_l2(trained_cnn, x, y, **params)
        results[name] = (norms, time.perf_counter() - began)
    benchmark.pedantic(lambda: carlini_wagner_l2(trained_cnn, x, y), rounds=1, iterations=1)
    reference = results["reference 9x1000"][0]
    for name, (norms, seconds) in results.items():
        found = torch.isfinite(norms)
        ratio = float(norms.median() / reference.median())
        benchmark.extra_info[name] = {"success": f"{int(found.sum())}/{len(y)}", "median_l2": float(norms.median()),
                                      "median_ratio_to_reference": ratio, "seconds": seconds}
        print(f"{name}: success {int(found.sum())}/{len(y)}, median L2 {float(norms.median()):.4f} "
              f"(x{ratio:.3f} of the reference), {seconds:.1f} s")
    defaults = results["defaults"][0]
    assert torch.isfinite(defaults).float().mean() >= 0.99
    assert float(defaults.median()) <= 1.05 * float(reference.median()) or math.isinf(float(reference.median()))
