"""PixelDP math against hand-computed values: noise scale, condition, bounds and radii."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from defenses.pixeldp.bounds import (bernstein_halfwidth, hoeffding_halfwidth, mean_bounds, one_sided_level,
                                     vote_bounds)
from defenses.pixeldp.certify import (DELTA_GRID, cohen_radius, largest_eps, pixeldp_gaussian_radius,
                                      pixeldp_laplace_radius, renyi_radius, robust_condition)
from defenses.pixeldp.noise import gaussian_sigma, laplace_scale


def test_gaussian_sigma_defaults_is_2_5373_L():
    assert gaussian_sigma(1.0) == pytest.approx(2.5373, abs=1e-4)
    assert gaussian_sigma(0.3, 1.0, 0.05) == pytest.approx(0.76119, abs=1e-4)
    assert gaussian_sigma(0.1, 0.5, 0.05) == pytest.approx(0.50746, abs=1e-4)
    assert laplace_scale(0.3, 0.5) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        gaussian_sigma(0.1, 1.0, 0.0)


def test_condition_hand_values():
    # e^2 * 0.1 + (1 + e) * 0.05 = 0.73891 + 0.18591 = 0.92482
    assert not robust_condition(0.92, 0.1, 1.0, 0.05)
    assert robust_condition(0.93, 0.1, 1.0, 0.05)
    # eps = 0.5: e^1 * 0.2 + (1 + e^0.5) * 0.01 = 0.54366 + 0.02649 = 0.57015
    assert not robust_condition(0.570, 0.2, 0.5, 0.01)
    assert robust_condition(0.571, 0.2, 0.5, 0.01)


def test_largest_eps_solves_the_quadratic():
    # 0.1 u^2 + 0.05 u - 0.55 = 0  ->  u = (-0.5 + sqrt(22.25)) / 2 = 2.108495
    assert largest_eps(0.6, 0.1, 0.05) == pytest.approx(math.log(2.108495), abs=1e-6)
    # u^2 + 2u - 4 = 0 -> u = sqrt(5) - 1
    assert largest_eps(0.6, 0.1, 0.2) == pytest.approx(math.log(math.sqrt(5) - 1), abs=1e-9)
    assert largest_eps(0.9, 0.05, 0.05) == 1.0  # capped: the Gaussian mechanism needs eps' <= 1
    assert largest_eps(0.3, 0.3, 0.001) == 0.0


def test_hoeffding_and_bernstein_halfwidths():
    level = one_sided_level(0.05, 10)
    assert level == pytest.approx(0.0025)
    # sqrt(ln(400) / 2000) = sqrt(5.991465 / 2000)
    assert hoeffding_halfwidth(1000, level) == pytest.approx(0.0547332, abs=1e-6)
    # sqrt(2 * 0.01 * ln(800) / 1000) + 7 ln(800) / (3 * 999) = 0.0115626 + 0.0156130
    assert float(bernstein_halfwidth(np.array(0.01), 1000, level)) == pytest.approx(0.0271756, abs=1e-6)
    assert float(bernstein_halfwidth(np.array(0.0), 1000, level)) == pytest.approx(0.0156130, abs=1e-6)


def test_mean_bounds_pick_the_tighter_method_and_clip():
    mean = np.array([[0.98, 0.02, 0.0]])
    variance = np.array([[1e-4, 1e-4, 0.0]])
    lower_h, upper_h = mean_bounds(mean, variance, 2000, 0.05, "hoeffding")
    lower_a, upper_a = mean_bounds(mean, variance, 2000, 0.05, "auto")
    width_h = hoeffding_halfwidth(2000, 0.05 / 6)
    assert lower_h[0, 0] == pytest.approx(0.98 - width_h)
    assert upper_h[0, 2] == pytest.approx(width_h) and lower_h[0, 2] == 0.0
    # Low variance: Bernstein (at half the level, 'auto') is much tighter than Hoeffding.
    width_b = float(bernstein_halfwidth(np.array(1e-4), 2000, 0.05 / 12))
    assert lower_a[0, 0] == pytest.approx(0.98 - width_b)
    assert lower_a[0, 0] > lower_h[0, 0]


def test_clopper_pearson_votes():
    # 0 of 100 votes: upper = 1 - (alpha/2)^(1/n) with alpha = eta/K = 0.005
    lower, upper = vote_bounds(np.array([[100, 0]]), 100, 0.01)
    assert upper[0, 1] == pytest.approx(1 - 0.0025 ** 0.01, abs=1e-9)
    assert lower[0, 0] == pytest.approx(0.0025 ** 0.01, abs=1e-9)
    assert lower[0, 1] == 0.0 and upper[0, 0] == 1.0
    # 50 of 100 at alpha = 0.005: scipy's beta quantiles, symmetric around 1/2.
    lower, upper = vote_bounds(np.array([[50, 50]]), 100, 0.01)
    assert lower[0, 0] == pytest.approx(1 - upper[0, 0], abs=1e-12)
    assert 0.35 < lower[0, 0] < 0.38


def test_pixeldp_radius_hand_values():
    # Only delta' = 0.05 (= delta): L' = L * eps'; eps' capped at 1 gives L' = L.
    assert pixeldp_gaussian_radius([0.9], [0.05], L=1.0, delta_grid=np.array([0.05]))[0] == pytest.approx(1.0)
    assert pixeldp_gaussian_radius([0.6], [0.1], L=1.0, delta_grid=np.array([0.05]))[0] == \
        pytest.approx(math.log(2.108495), abs=1e-6)
    # delta' = 0.2: L' = L eps' sqrt(ln 25 / ln 6.25) = 0.211935 * 1.325318
    assert pixeldp_gaussian_radius([0.6], [0.1], L=1.0, delta_grid=np.array([0.2]))[0] == \
        pytest.approx(0.280881, abs=1e-5)
    # Full grid: the best delta' for a confident prediction gives more than L.
    best = pixeldp_gaussian_radius([0.999], [0.0005], L=0.1)[0]
    assert 0.1 < best <= 0.1 * math.sqrt(math.log(25) / math.log(1.25 / 0.299)) + 1e-12
    assert pixeldp_laplace_radius([0.8], [0.1], L=1.0)[0] == pytest.approx(math.log(8) / 2)
    assert cohen_radius([0.975], sigma=1.0)[0] == pytest.approx(1.959964, abs=1e-6)
    assert cohen_radius([0.5], sigma=1.0)[0] == 0.0


def test_pixeldp_radius_matches_a_grid_search_like_the_original():
    # The original binary-searches eps' for every delta' on the grid; our closed form must agree.
    rng = np.random.default_rng(0)
    for _ in range(20):
        p_lb, p_ub = sorted(rng.uniform(0, 1, 2))[::-1]
        best = 0.0
        for d in DELTA_GRID[::7]:
            lo, hi = 0.0, 1.0
            if not robust_condition(p_lb, p_ub, 1e-12, d):
                continue
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if robust_condition(p_lb, p_ub, mid, d) else (lo, mid)
            best = max(best, 0.3 * lo * math.sqrt(math.log(25) / math.log(1.25 / d)))
        ours = pixeldp_gaussian_radius([p_lb], [p_ub], L=0.3, delta_grid=DELTA_GRID[::7])[0]
        assert ours == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("radius_fn", ["pixeldp", "laplace", "cohen", "renyi"])
def test_radius_is_monotone_in_p_lb_and_zero_when_not_separated(radius_fn):
    sigma = gaussian_sigma(0.3)
    fns = {"pixeldp": lambda a, b: pixeldp_gaussian_radius(a, b, L=0.3),
           "laplace": lambda a, b: pixeldp_laplace_radius(a, b, L=0.3),
           "cohen": lambda a, b: cohen_radius(a, sigma=sigma),
           "renyi": lambda a, b: renyi_radius(a, b, sigma=sigma)}
    fn = fns[radius_fn]
    p_lb = np.linspace(0.0, 1.0, 201)
    for p_ub in (0.0001, 0.05, 0.2, 0.45):
        radius = fn(p_lb, np.full_like(p_lb, p_ub))
        assert np.all(np.diff(radius) >= -1e-12)
        assert np.all(radius >= 0) and np.all(np.isfinite(radius[:-1]))
        if radius_fn != "cohen":  # Cohen's uses p_lb > 1/2 only
            assert np.all(radius[p_lb <= p_ub] == 0)
        assert radius[-2] > 0
    assert np.all(fn(np.array([0.3, 0.5]), np.array([0.3, 0.5])) == 0)


def test_every_radius_respects_cohens_tight_bound():
    # Cohen et al.'s radius sigma/2 (Phi^-1(p_A) - Phi^-1(p_B)) is tight for Gaussian noise, so
    # no sound certificate from the same (p_lb, p_ub) can exceed it.
    rng = np.random.default_rng(1)
    p_lb = rng.uniform(0.3, 0.9999, 500)
    p_ub = np.minimum(rng.uniform(0.0, 0.5, 500), 1 - p_lb)
    sigma = gaussian_sigma(0.3)
    tight = np.maximum(sigma / 2 * (norm.ppf(p_lb) - norm.ppf(np.maximum(p_ub, 1e-300))), 0.0)
    assert np.all(pixeldp_gaussian_radius(p_lb, p_ub, L=0.3) <= tight + 1e-9)
    assert np.all(renyi_radius(p_lb, p_ub, sigma=sigma) <= tight + 1e-9)
    assert np.all(cohen_radius(p_lb, sigma=sigma) <= tight + 1e-9)
