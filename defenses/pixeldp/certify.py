"""Certified radii from confidence bounds: PixelDP's DP condition, Cohen et al.'s and Li et al.'s bounds."""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm as gaussian

CERTIFIERS = ("pixeldp", "cohen", "renyi")
# The original's delta' grid for the radius search (0.001 .. 0.299).
DELTA_GRID = np.round(np.arange(1, 300) * 1e-3, 3)
# Renyi orders alpha > 1 for Li et al.'s supremum (any alpha gives a valid radius).
ALPHA_GRID = 1.0 + np.logspace(-3, 3, 400)


def robust_condition(p_lb, p_ub, eps: float, delta: float) -> np.ndarray:
    """PixelDP's robustness condition E_lb(A_k) > e^(2 eps) max_{i != k} E_ub(A_i) + (1 + e^eps) delta.

    Lecuyer et al. 2019, Prop. 1; p_ub is already the max over the other classes.
    """
    p_lb, p_ub = np.asarray(p_lb, dtype=np.float64), np.asarray(p_ub, dtype=np.float64)
    return p_lb > math.exp(2 * eps) * p_ub + (1 + math.exp(eps)) * delta


def largest_eps(p_lb, p_ub, delta, eps_max: float = 1.0) -> np.ndarray:
    """The supremum of eps' in (0, eps_max] meeting the condition at delta' (0 where none does).

    With u = e^eps' the condition is p_ub u^2 + delta u + delta - p_lb < 0: u below the positive
    root of that quadratic. Arrays broadcast.
    """
    p_lb, p_ub, delta = (np.asarray(v, dtype=np.float64) for v in (p_lb, p_ub, delta))
    a = np.maximum(p_ub, 0.0)
    gap = p_lb - delta  # minus the constant term
    disc = np.maximum(delta ** 2 + 4 * a * gap, 0.0)
    # The positive root written as 2 gap / (delta + sqrt(disc)): the textbook (-delta + sqrt(disc)) / 2a
    # cancels catastrophically when p_ub is tiny (it gave radius 0 at p_lb = 1, p_ub = 0).
    with np.errstate(divide="ignore", invalid="ignore"):
        root = np.where(gap > 0, 2 * gap / (delta + np.sqrt(disc)), 0.0)
    eps = np.log(np.maximum(root, 1.0))
    return np.minimum(eps, eps_max)


def pixeldp_gaussian_radius(p_lb, p_ub, *, L: float, eps: float = 1.0, delta: float = 0.05,
                            delta_grid: np.ndarray = DELTA_GRID) -> np.ndarray:
    """Largest L' certified by the Gaussian noise calibrated to (L, eps, delta) (noise-layer units).

    The fixed sigma = L sqrt(2 ln(1.25/delta)) / eps is also (eps', delta')-DP at
    L' = L (eps'/eps) sqrt(ln(1.25/delta)) / sqrt(ln(1.25/delta')) for every eps' <= 1; the
    radius is the largest L' over the delta' grid whose (eps', delta') meets the condition
    (Lecuyer et al. 2019, Sec. III-C). 0 when no pair does (in particular when p_lb <= p_ub).

    Args:
        p_lb: (N,) lower bounds of the predicted class's expected score.
        p_ub: (N,) upper bounds of the largest expected score among the other classes.
    """
    p_lb = np.asarray(p_lb, dtype=np.float64)[..., None]
    p_ub = np.asarray(p_ub, dtype=np.float64)[..., None]
    grid = np.asarray(delta_grid, dtype=np.float64)
    eps_prime = largest_eps(p_lb, p_ub, grid)
    scale = math.sqrt(math.log(1.25 / delta)) / np.sqrt(np.log(1.25 / grid))
    return (L * eps_prime / eps * scale).max(axis=-1)


def pixeldp_laplace_radius(p_lb, p_ub, *, L: float, eps: float = 1.0) -> np.ndarray:
    """L' = L ln(p_lb / p_ub) / (2 eps) for Laplace noise of scale L / eps (pure DP, L1 radius); 0 if p_lb <= p_ub."""
    p_lb, p_ub = np.asarray(p_lb, dtype=np.float64), np.asarray(p_ub, dtype=np.float64)
    with np.errstate(divide="ignore"):
        ratio = np.log(np.maximum(p_lb, 1e-300) / np.maximum(p_ub, 1e-300))
    return np.where(p_lb > p_ub, L * ratio / (2 * eps), 0.0)


def cohen_radius(p_lb, *, sigma: float) -> np.ndarray:
    """R = sigma Phi^-1(p_lb) (Cohen et al. 2019, Thm. 1 with p_B <= 1 - p_A); 0 (abstain) when p_lb <= 1/2.

    Also valid for expected softmax scores (Salman et al. 2019, Lemma 2: Phi^-1 of a smoothed
    [0,1]-valued function is 1/sigma-Lipschitz).
    """
    p_lb = np.asarray(p_lb, dtype=np.float64)
    return np.where(p_lb > 0.5, sigma * gaussian.ppf(np.clip(p_lb, 0.5, 1.0)), 0.0)


def renyi_radius(p_lb, p_ub, *, sigma: float, alphas: np.ndarray = ALPHA_GRID) -> np.ndarray:
    """Li et al. 2019 (Renyi divergence) radius for Gaussian noise, maximized over alpha on a grid.

    ||delta||_2 < sup_{alpha>1} sqrt(-(2 sigma^2 / alpha) ln(1 - p1 - p2 + 2 M_{1-alpha}(p1, p2))),
    M the power mean ((p1^(1-a) + p2^(1-a)) / 2)^(1/(1-a)); p1 = p_lb, p2 = min(p_ub, 1 - p_lb).
    0 when p_lb <= p_ub.
    """
    p1 = np.asarray(p_lb, dtype=np.float64)[..., None]
    separated = p1[..., 0] > np.asarray(p_ub, dtype=np.float64)
    # p2 > 0 keeps the logs finite (p2 -> 0 only grows the radius, which stays finite here).
    p2 = np.maximum(np.minimum(np.asarray(p_ub, dtype=np.float64)[..., None], 1.0 - p1), 1e-300)
    a = np.asarray(alphas, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.stack(np.broadcast_arrays((1 - a) * np.log(p1), (1 - a) * np.log(p2)))
        # log M = (logsumexp((1-a) log p) - log 2) / (1 - a), stable for large alpha and tiny p2.
        top = logs.max(axis=0)
        log_mean = (top + np.log(np.exp(logs - top).sum(axis=0)) - math.log(2.0)) / (1 - a)
        inner = 1.0 - p1 - p2 + 2.0 * np.exp(log_mean)
        squared = -(2 * sigma ** 2 / a) * np.log(inner)
    squared = np.where(np.isfinite(squared), squared, np.where(inner <= 0, np.inf, 0.0))
    radius = np.sqrt(np.maximum(squared, 0.0)).max(axis=-1)
    return np.where(separated, radius, 0.0)
