"""PixelDP soundness: sensitivity bounds hold, and no strong EOT attack beats a certificate too often."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attacks.eot import EOT
from attacks.pgd import projected_gradient_descent
from bench.core.types import ThreatModel
from defenses.pixeldp.sensitivity import (DividedConv2d, conv_l1_bound, conv_l2_bound, kernel_divisor,
                                          operator_norm_estimate, parseval_step, stem_sensitivity)
from pixeldp_helpers import attached

CONFIGS = [  # (in, out, kernel, stride, padding, input size)
    (1, 32, 5, 2, 2, 28), (3, 16, 3, 1, 1, 16), (3, 8, 4, 2, 1, 16), (2, 8, 3, 3, 0, 15), (1, 4, 2, 3, 0, 12),
]


def _conv(c_in, c_out, k, s, p, seed):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, k, stride=s, padding=p, bias=False)


@pytest.mark.parametrize("config", CONFIGS)
def test_l2_bound_is_above_power_iteration_on_random_convs(config):
    c_in, c_out, k, s, p, size = config
    conv = _conv(c_in, c_out, k, s, p, seed=sum(config))
    std = torch.tensor([0.2, 0.5, 0.3][:c_in])
    for scale in (None, std):
        fn = conv if scale is None else (lambda x, sc=scale: conv(x / sc.view(1, -1, 1, 1)))
        estimate = operator_norm_estimate(fn, (c_in, size, size), iters=200, generator=torch.Generator().manual_seed(0))
        bound = conv_l2_bound(conv, scale)
        print(f"{config} std={scale is not None}: bound {bound:.4f} >= power iteration {estimate:.4f}")
        assert bound >= estimate * (1 - 1e-5)
        assert bound <= 3.0 * estimate  # not vacuous


@pytest.mark.slow
def test_l2_bound_on_parseval_projected_and_trained_stems():
    conv = _conv(1, 32, 5, 2, 2, seed=3)
    divided = DividedConv2d.from_conv(conv, kernel_divisor(conv, "l2"))
    assert divided.divisor == 3.0
    for _ in range(300):
        parseval_step(divided.weight, beta=3e-4, iters=20)
    singular = torch.linalg.svdvals(divided.weight.detach().view(32, -1))
    assert singular.max().item() == pytest.approx(1.0, abs=0.02)
    estimate = operator_norm_estimate(divided, (1, 28, 28), iters=200)
    bound = conv_l2_bound(divided)
    print(f"projected stem: bound {bound:.4f}, power iteration {estimate:.4f}")
    assert estimate * (1 - 1e-5) <= bound <= 1.03

    model = attached(0.3).model
    estimate = operator_norm_estimate(model.pre_noise, (1, 28, 28), iters=200)
    bound = stem_sensitivity(model, "l2")
    print(f"trained stem: bound {bound:.4f}, power iteration {estimate:.4f}")
    assert bound >= estimate * (1 - 1e-5)


@pytest.mark.parametrize("config", CONFIGS)
def test_l1_bound_is_above_the_exact_column_norm(config):
    c_in, c_out, k, s, p, size = config
    conv = _conv(c_in, c_out, k, s, p, seed=sum(config))
    # The L1->L1 norm of a linear map is its largest column L1 norm: push every basis image through.
    basis = torch.eye(c_in * size * size).view(-1, c_in, size, size)
    with torch.no_grad():
        exact = conv(basis).flatten(1).abs().sum(dim=1).max().item()
    bound = conv_l1_bound(conv)
    assert exact * (1 - 1e-6) <= bound
    if size >= 3 * k:  # interior pixels reach every residue class: the bound is exact
        assert bound == pytest.approx(exact, rel=1e-5)


@pytest.mark.slow
def test_no_certificate_is_broken_by_an_eot_pgd_attack(mnist_test):
    """Certify, then attack each certified example with EOT PGD-L2 of norm just below its radius."""
    torch.manual_seed(0)
    eta = 0.05
    defense = attached(0.3, seed=1, draws_certify=500, draws_attack=300, eta=eta)
    x, _ = mnist_test
    x = x[:80]
    pred, radius = defense.certify(x)
    certified = torch.nonzero(radius > 0).flatten()
    assert len(certified) >= 40, f"only {len(certified)} of {len(x)} certified; the smoke model is too weak"
    eot = EOT(defense.model, draws=16)
    # Attack in groups of equal eps (radius rounded down to a 0.01 grid, times 0.99).
    eps = torch.floor(radius[certified] * 0.99 / 0.01) * 0.01
    generator = torch.Generator().manual_seed(2)
    violations = attacked = 0
    for value in torch.unique(eps):
        if value <= 0:
            continue
        members = certified[eps == value]
        threat = ThreatModel("l2", float(value))
        x_adv = projected_gradient_descent(eot, x[members], pred[members], threat=threat, steps=30,
                                           step_size=2.5 * float(value) / 30 * 2, loss="cw", generator=generator)
        norms = threat.norm_of(x_adv - x[members])
        assert torch.all(norms < radius[members])
        adv_pred, _ = defense.judge(x_adv)
        violations += int((adv_pred != pred[members]).sum())
        attacked += len(members)
    print(f"EOT PGD-L2 vs certificates: {violations} of {attacked} certified examples flipped below their radius "
          f"(mean radius {radius[certified].mean():.3f}, eta {eta})")
    assert attacked >= 40
    assert violations <= math.floor(eta * attacked)
