"""Carlini-Wagner L2 specifics: the margin, minimum norms on a linear model, targets, kappa, failures."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attacks.cw import carlini_wagner_l2, cw_l2, margin_loss
from bench.core.types import ThreatModel

INF_L2 = ThreatModel("l2", math.inf)


class Linear(nn.Module):
    """logits = W x + b on flattened (N, 1, 8, 8) images; a large negative bias makes every logit negative."""

    def __init__(self, classes: int = 3, bias: float = -100.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, 64, generator=g) * 0.5)
        self.bias = nn.Parameter(torch.full((classes,), bias))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


def analytic_min_l2(model: Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Distance from x to the nearest decision boundary of a linear model, ignoring the box (N,)."""
    with torch.no_grad():
        logits = model(x)
    w = model.weight.detach()
    distances = []
    for i in range(x.shape[0]):
        yi = int(y[i])
        best = math.inf
        for j in range(w.shape[0]):
            if j != yi:
                gap = float(logits[i, yi] - logits[i, j])
                best = min(best, gap / float((w[yi] - w[j]).norm()))
        distances.append(best)
    return torch.tensor(distances)


@pytest.fixture
def linear_setup():
    model = Linear()
    g = torch.Generator().manual_seed(3)
    # Mid-grey images keep the box constraint inactive, so the analytic distance is the true minimum.
    x = 0.4 + 0.2 * torch.rand(6, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_margin_masks_true_logit_with_minus_inf_when_all_logits_are_negative():
    logits = torch.tensor([[-1.0, -5.0, -3.0]])
    y = torch.tensor([0])
    # Z_y - max_{i != y} Z_i = -1 - (-3) = 2: not adversarial. Masking with 0 (torchattacks) gives -1 - 0 < 0.
    assert margin_loss(logits, y, targeted=False).item() == pytest.approx(2.0)
    assert margin_loss(logits, torch.tensor([2]), targeted=True).item() == pytest.approx(-1.0 - (-3.0))


def test_all_negative_logits_model_is_attacked_to_the_analytic_minimum(linear_setup):
    model, x, y = linear_setup
    with torch.no_grad():
        assert (model(x) < 0).all()
    x_adv, norms = carlini_wagner_l2(model, x, y, steps=300, binary_steps=9, c=1e-3, lr=1e-2)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) != y).all()
    exact = analytic_min_l2(model, x, y)
    assert torch.allclose(norms, (x_adv - x).flatten(1).norm(dim=1), rtol=1e-4)
    assert (norms >= exact * (1 - 1e-3)).all(), "below the true minimum: the norm bookkeeping is wrong"
    assert (norms <= exact * 1.05).all(), f"CW norms {norms} vs analytic {exact}"


def test_binary_search_improves_on_a_single_constant(linear_setup):
    model, x, y = linear_setup
    _, one = carlini_wagner_l2(model, x, y, steps=100, binary_steps=1, c=10.0)
    _, nine = carlini_wagner_l2(model, x, y, steps=100, binary_steps=9, c=10.0)
    assert (nine <= one + 1e-6).all() and (nine < one).any()


def test_targeted_reaches_the_target(linear_setup):
    model, x, y = linear_setup
    x_adv = cw_l2(model, x, y, threat=INF_L2, steps=200, target="next")
    with torch.no_grad():
        assert torch.equal(model(x_adv).argmax(1), (y + 1) % 3)


def test_kappa_buys_confidence_at_a_larger_norm(linear_setup):
    model, x, y = linear_setup
    plain, plain_norms = carlini_wagner_l2(model, x, y, steps=200, kappa=0.0)
    sure, sure_norms = carlini_wagner_l2(model, x, y, steps=200, kappa=1.0)
    with torch.no_grad():
        assert (margin_loss(model(sure), y, targeted=False) < -1.0).all()
    assert (sure_norms > plain_norms).all()


def test_unbreakable_model_returns_the_input():
    class Constant(nn.Module):
        def forward(self, x):
            return torch.tensor([[5.0, 0.0, 0.0]]).expand(x.shape[0], 3) + 0 * x.flatten(1)[:, :1]

    x = torch.rand(3, 1, 8, 8)
    y = torch.zeros(3, dtype=torch.long)
    x_adv, norms = carlini_wagner_l2(Constant(), x, y, steps=20, binary_steps=3)
    assert torch.equal(x_adv, x) and torch.isinf(norms).all()


def test_finite_budget_keeps_only_adversarials_inside_it(linear_setup):
    model, x, y = linear_setup
    exact = analytic_min_l2(model, x, y)
    eps = float(exact.median())
    x_adv = cw_l2(model, x, y, threat=ThreatModel("l2", eps), steps=200)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert (norms <= eps * (1 + 1e-5)).all()
    # Points whose minimum is well beyond eps come back untouched.
    assert torch.equal(x_adv[exact > eps * 1.1], x[exact > eps * 1.1])


def test_model_mode_and_parameters_untouched(linear_setup):
    model, x, y = linear_setup
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    cw_l2(model, x, y, threat=INF_L2, steps=10, binary_steps=2)
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
