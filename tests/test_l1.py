"""The L1 threat model (exact ball-and-box projection, uniform init) and L1-APGD (Croce & Hein 2021)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attacks.apgd_l1 import apgd_l1, sparse_direction
from attacks.pgd import projected_gradient_descent
from bench.profile.config import parse_profile
from bench.core.registry import ATTACKS
from bench.core.types import ThreatModel, add_towards_centre, project_l1_box


def bisection_projection(delta: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference for one vector (d,): the soft-threshold-and-clip root found by 200 float64 bisection steps."""
    delta, x = delta.double(), x.double()
    cap = torch.where(delta > 0, 1 - x, x).clamp_min(0)

    def shrunk(lam: float) -> torch.Tensor:
        return torch.minimum((delta.abs() - lam).clamp_min(0), cap)

    if shrunk(0.0).sum() <= eps:
        return shrunk(0.0) * delta.sign()
    low, high = 0.0, float(delta.abs().max())
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if shrunk(middle).sum() > eps else (low, middle)
    return shrunk(high) * delta.sign()


def saturated_images(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """(n, d) pixels in [0, 1] with many exact 0s and 1s, like MNIST's."""
    x = torch.rand(n, d, generator=generator)
    x[x < 0.3] = 0.0
    x[x > 0.8] = 1.0
    return x


def test_projection_matches_bisection_reference():
    g = torch.Generator().manual_seed(0)
    for d in (1, 2, 3, 5, 8, 13):
        x = saturated_images(20, d, g)
        delta = torch.randn(20, d, generator=g) * torch.rand(20, 1, generator=g) * 3
        for eps in (0.0, 0.1, 0.7, 2.0, 50.0):
            got = project_l1_box(delta, x, eps)
            want = torch.stack([bisection_projection(delta[i], x[i], eps) for i in range(20)])
            assert torch.allclose(got.double(), want, atol=1e-6), (d, eps)
            assert (got.abs().sum(dim=1) <= eps + 1e-6).all()
            assert ((x + got >= 0) & (x + got <= 1)).all()


def test_projection_is_the_nearest_feasible_point():
    """Variational inequality of a Euclidean projection p of z onto a convex set: <z - p, c - p> <= 0 for every
    c in it."""
    g = torch.Generator().manual_seed(1)
    x = saturated_images(1, 6, g).expand(2000, 6)
    z = torch.randn(1, 6, generator=g).expand(2000, 6) * 2
    eps = 1.5
    p = project_l1_box(z[:1], x[:1], eps)
    # Feasible points: random directions shrunk into ball and box (plus the box's own corners clipped).
    candidates = project_l1_box(torch.randn(2000, 6, generator=g) * 3, x, eps)
    assert ((z[:1] - p) * (candidates - p)).sum(dim=1).max() <= 1e-6
    assert (z[:1] - p).norm() <= (z - candidates).norm(dim=1).min() + 1e-6


def test_project_keeps_inside_points_and_handles_extremes():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 4, 4, generator=g)
    threat = ThreatModel("l1", 2.0)
    inside = threat.project(x + 0.01 * torch.randn(x.shape, generator=g), x)
    assert torch.allclose(threat.project(inside, x), inside, atol=1e-7)
    far = x + 10 * torch.randn(x.shape, generator=g)
    assert torch.equal(ThreatModel("l1", 0.0).project(far, x), x)
    assert torch.equal(ThreatModel("l1", math.inf).project(far, x), far.clamp(0, 1))
    projected = threat.project(far, x)
    assert torch.allclose(threat.norm_of(projected - x), torch.full((3,), 2.0), atol=1e-5)
    assert bool(threat.contains(projected, x, tol=1e-6).all())


def test_l1_projection_stays_in_the_ball_at_imagenet_size():
    """Dense small perturbations of 3x299x299 images: rounding x + delta to nearest pushed the float32 norm up to
    2.7e-3 past eps = 20 (every coordinate shifted by the same soft threshold, rounding errors of one sign); rounded
    towards x, the norm is at most eps with no tolerance, and the budget lost to rounding is under 1e-3 of eps
    (measured: at most 7e-3 at scale 1e-4, where every pixel moves by about 1e-4)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 299, 299), generator=g).float() / 255
    threat = ThreatModel("l1", 20.0)
    for scale in (1e-4, 1e-3, 1e-2):
        x_adv = threat.project(x + scale * torch.randn(x.shape, generator=g), x)
        norms = threat.norm_of(x_adv - x)
        assert bool((norms <= 20.0).all()), (scale, norms)
        assert bool((norms >= 20.0 * (1 - 1e-3)).all()), (scale, norms)
        assert bool(((x_adv >= 0) & (x_adv <= 1)).all())


def test_add_towards_centre_never_exceeds_the_perturbation():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1000, generator=g)
    x[:100], x[100:200] = 0.0, 1.0
    delta = (torch.randn(1000, generator=g, dtype=torch.float64) * 1e-3).clamp(-x.double(), 1 - x.double())
    got = add_towards_centre(x, delta)
    assert got.dtype == torch.float32
    assert bool(((got.double() - x.double()).abs() <= delta.abs()).all())
    assert torch.allclose(got.double(), x.double() + delta, atol=1e-7)
    assert bool(((got >= 0) & (got <= 1)).all())


def test_norm_of_l1():
    delta = torch.zeros(2, 1, 2, 2)
    delta[0, 0, 0, 0], delta[0, 0, 1, 1] = 3.0, -4.0
    assert ThreatModel("l1", 1).norm_of(delta).tolist() == [7.0, 0.0]


def test_random_init_is_uniform_in_the_l1_ball():
    """For a uniform point of the L1 ball in d dimensions, P(||delta||_1 <= r eps) = r^d; signs are fair."""
    g = torch.Generator().manual_seed(3)
    x = torch.full((4000, 1, 2, 2), 0.5)  # eps 0.4 < 0.5: the box never clips
    threat = ThreatModel("l1", 0.4)
    start = threat.random_init(x, g)
    norms = threat.norm_of(start - x)
    assert bool(threat.contains(start, x, tol=1e-6).all())
    for r in (0.5, 0.8, 0.95):
        assert abs(float((norms <= r * 0.4).float().mean()) - r ** 4) < 0.03
    assert abs(float(((start - x) > 0).float().mean()) - 0.5) < 0.02
    assert torch.equal(threat.random_init(x[:5], torch.Generator().manual_seed(9)),
                       threat.random_init(x[:5], torch.Generator().manual_seed(9)))


def test_sparse_direction_moves_only_top_movable_coordinates():
    x_adv = torch.tensor([[0.0, 1.0, 0.5, 0.5, 0.0, 0.2]]).view(1, 1, 1, 6)
    grad = torch.tensor([[-9.0, 8.0, 3.0, -2.0, 1.0, 0.5]]).view(1, 1, 1, 6)
    # -9 and 8 push out of the box and cannot move; the top half of the rest by |grad| is {3, -2, 1}.
    direction = sparse_direction(grad, x_adv, torch.tensor([0.5]))
    assert direction.flatten().tolist() == pytest.approx([0, 0, 1 / 3, -1 / 3, 1 / 3, 0])
    assert float(direction.abs().sum()) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def digits(mnist_test):
    return mnist_test[0][:64], mnist_test[1][:64]


def correct_count(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with torch.no_grad():
        return int((model(x).argmax(1) == y).sum())


def test_apgd_l1_is_not_weaker_than_plain_l1_pgd(trained_cnn, mnist_test):
    """At L1 = 6 (6 pixels flipped from 0 to 1) on 200 digits, L1-APGD is at least as strong as PGD with the same
    steps and the exact projection, and at L1 = 10 it breaks most correct digits.

    The gap between the two is a few digits (measured over 5 fixture seeds: APGD alone broke 3-5, PGD alone 0, and
    both left 56-69% correct at L1 = 6; 26-32% at L1 = 10), smaller than the spread that training on another CPU
    gives the fixture, so the comparison is a paired sign test on the digits where exactly one attack succeeds:
    PGD's excess wins must stay within two standard deviations of chance. A broken APGD fails it by dozens."""
    x, y = mnist_test
    clean = correct_count(trained_cnn, x, y)
    assert clean >= 185
    threat = ThreatModel("l1", 6.0)
    ours = apgd_l1(trained_cnn, x, y, threat=threat, generator=torch.Generator().manual_seed(0))
    baseline = projected_gradient_descent(trained_cnn, x, y, threat=threat, steps=100,
                                          generator=torch.Generator().manual_seed(0))
    assert bool(threat.contains(ours, x, tol=1e-6).all()) and bool(threat.contains(baseline, x, tol=1e-6).all())
    with torch.no_grad():
        ours_broke = trained_cnn(ours).argmax(1) != y
        baseline_broke = trained_cnn(baseline).argmax(1) != y
    only_baseline = int((baseline_broke & ~ours_broke).sum())
    only_ours = int((ours_broke & ~baseline_broke).sum())
    assert only_baseline - only_ours <= 2 * math.sqrt(only_baseline + only_ours), (only_baseline, only_ours)
    assert int((~ours_broke).sum()) <= 0.8 * clean
    wide = apgd_l1(trained_cnn, x, y, threat=ThreatModel("l1", 10.0), generator=torch.Generator().manual_seed(0))
    assert correct_count(trained_cnn, wide, y) <= 0.45 * clean


def test_apgd_l1_eot_on_a_noisy_model(trained_cnn, digits):
    """The EOT version attacks a randomized model through averaged gradients and stays in ball and box."""

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.generator = torch.Generator().manual_seed(5)

        def forward(self, x):
            return trained_cnn(x + 0.1 * torch.randn(x.shape, generator=self.generator))

    x, y = digits[0][:16], digits[1][:16]
    model = Noisy()
    threat = ThreatModel("l1", 20.0)
    x_adv = ATTACKS.get("apgd_l1_eot")(model, x, y, threat=threat, steps=20, draws=4,
                                      generator=torch.Generator().manual_seed(0))
    assert bool(threat.contains(x_adv, x, tol=1e-6).all())
    assert correct_count(model, x_adv, y) <= 4 < correct_count(model, x, y)


def test_apgd_l1_refuses_other_norms(trained_cnn, digits):
    with pytest.raises(ValueError, match="l1 attack"):
        apgd_l1(trained_cnn, *digits, threat=ThreatModel("l2", 1.0))


def test_profile_with_an_l1_attack():
    text = """
[run]
datasets = ["mnist5k"]
seed = 0
l_attack = { l1 = [0.0, 4.0, 8.0] }

[defenses.undefended]
params = { arch = "cnn_small", steps = 10 }

[attacks.apgd_l1]
eps = [4.0, 8.0]
params = { steps = 20 }
"""
    profile = parse_profile(text, "l1test")
    cells = [c for c in profile.cells if c.attack == "apgd_l1"]
    assert [(c.norm, c.eps) for c in cells] == [("l1", 4.0), ("l1", 8.0)]
    assert cells[0].threat() == ThreatModel("l1", 4.0)
    assert profile.l_attack["l1"] == [0.0, 4.0, 8.0]


def test_tables_and_plots_show_an_l1_column_and_panel():
    from bench.reporting.plots import plot_accuracy_vs_attack
    from bench.reporting.tables import accuracy_frame, accuracy_pivot
    from bench.core.types import Cell, Record

    def records(adv_preds, norms):
        return [Record(index=i, label=1, clean_pred=1, adv_pred=p, norm=v, radius=None, seconds=0.0, forward_passes=1)
                for i, (p, v) in enumerate(zip(adv_preds, norms, strict=True))]

    cells = [(Cell("mnist5k", "undefended", "none"), records([1] * 4, [0.0] * 4)),
             (Cell("mnist5k", "undefended", "apgd_l1", "l1", 4.0), records([1, 0, 0, 1], [4.0] * 4)),
             (Cell("mnist5k", "undefended", "pgd_l2", "l2", 1.0), records([1, 1, 0, 1], [1.0] * 4))]
    frame = accuracy_frame(cells, {"l1": [0.0, 4.0], "l2": [0.0, 1.0]})
    row = frame[(frame["attack"] == "apgd_l1")]
    assert row["norm"].tolist() == ["l1"] and row["correct"].tolist() == [2]
    assert "apgd_l1 l1=4" in accuracy_pivot(frame).columns
    figure = plot_accuracy_vs_attack(frame)
    assert len(figure.axes) == 2 and "L1" in figure.axes[0].get_xlabel()
