"""cw_l2's defaults must succeed: an adversarial example for >= 99% of correctly classified examples (issue 14)."""
from __future__ import annotations

import math

import torch

from attacks.cw import PAPER, cw_l2
from bench.core.registry import ATTACKS
from bench.core.types import ThreatModel

EXAMPLES = 40


def test_cw_l2_defaults_break_every_correct_example(trained_cnn, mnist_test):
    x, y = mnist_test[0][:EXAMPLES + 5], mnist_test[1][:EXAMPLES + 5]
    with torch.no_grad():
        correct = trained_cnn(x).argmax(1) == y
    x, y = x[correct][:EXAMPLES], y[correct][:EXAMPLES]
    x_adv = cw_l2(trained_cnn, x, y, threat=ThreatModel("l2", math.inf))
    with torch.no_grad():
        broken = trained_cnn(x_adv).argmax(1) != y
    assert broken.float().mean() >= 0.99, f"cw_l2 defaults broke only {int(broken.sum())}/{len(y)}"
    norms = (x_adv - x).flatten(1).norm(dim=1)[broken]
    # Minimum-norm: MNIST CNNs break at L2 ~1-2; a median far above says the search did not converge.
    assert float(norms.median()) < 2.5


def test_paper_preset_keeps_the_papers_values():
    import inspect

    parameters = inspect.signature(ATTACKS.get("cw_l2_paper")).parameters
    assert {k: parameters[k].default for k in PAPER} == PAPER
    defaults = inspect.signature(ATTACKS.get("cw_l2")).parameters
    assert defaults["lr"].default > PAPER["lr"] and defaults["c"].default > PAPER["c"]
