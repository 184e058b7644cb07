"""Simultaneous Monte Carlo confidence bounds on expected softmax scores and vote frequencies."""
from __future__ import annotations

import math

import numpy as np

from bench.core.stats import clopper_pearson

BOUNDS = ("hoeffding", "bernstein", "auto")


def one_sided_level(eta: float, classes: int, methods: int = 1) -> float:
    """Failure probability of each one-sided bound: eta / (2 K methods) (Bonferroni).

    A lower AND an upper bound for each of the K classes must hold together (the predicted
    class is chosen from the same draws), and 'auto' takes the tighter of two methods.
    """
    if not 0 < eta < 1:
        raise ValueError(f"eta must be in (0, 1), got {eta}")
    return eta / (2 * classes * methods)


def hoeffding_halfwidth(draws: int, level: float) -> float:
    """sqrt(ln(1/level) / (2n)): one-sided Hoeffding for the mean of n values in [0, 1].

    With level = eta/(2K) this is the reference's sqrt(ln(2K/eta) / (2n)).
    """
    return math.sqrt(math.log(1.0 / level) / (2.0 * draws))


def bernstein_halfwidth(variance: np.ndarray, draws: int, level: float) -> np.ndarray:
    """Empirical Bernstein half-width sqrt(2 V ln(2/level) / n) + 7 ln(2/level) / (3 (n - 1)).

    Maurer & Pontil 2009, Thm. 4 (one-sided, V the unbiased sample variance, values in [0,1]);
    its ln(2/level) already pays for estimating the variance.
    """
    if draws < 2:
        return np.full(np.shape(variance), np.inf)
    log_term = math.log(2.0 / level)
    v = np.clip(np.asarray(variance, dtype=np.float64), 0.0, None)
    return np.sqrt(2.0 * v * log_term / draws) + 7.0 * log_term / (3.0 * (draws - 1))


def mean_bounds(mean: np.ndarray, variance: np.ndarray, draws: int, eta: float,
                method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) bounds (N, K) on E[score]; per example all K hold together w.p. >= 1 - eta.

    Args:
        mean: (N, K) Monte Carlo means of scores in [0, 1].
        variance: (N, K) unbiased sample variances.
        draws: n, the number of draws behind each mean.
        eta: failure probability per example, shared by the K classes (Bonferroni).
        method: 'hoeffding', 'bernstein', or 'auto' (the tighter one per entry; each at half the level).
    """
    if method not in BOUNDS:
        raise ValueError(f"unknown bound {method!r}; use one of {BOUNDS}")
    mean = np.asarray(mean, dtype=np.float64)
    classes = mean.shape[-1]
    level = one_sided_level(eta, classes, 2 if method == "auto" else 1)
    if method == "hoeffding":
        width = np.full(mean.shape, hoeffding_halfwidth(draws, level))
    elif method == "bernstein":
        width = bernstein_halfwidth(variance, draws, level)
    else:
        width = np.minimum(hoeffding_halfwidth(draws, level), bernstein_halfwidth(variance, draws, level))
    return np.clip(mean - width, 0.0, 1.0), np.clip(mean + width, 0.0, 1.0)


def vote_bounds(counts: np.ndarray, draws: int, eta: float) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) Clopper-Pearson bounds (N, K) on vote frequencies, simultaneous over K classes.

    Each class gets a two-sided exact interval at alpha = eta / K (eta/(2K) per side).
    """
    counts = np.asarray(counts, dtype=np.float64)
    lower, upper = clopper_pearson(counts, draws, alpha=2 * one_sided_level(eta, counts.shape[-1]))
    return np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
