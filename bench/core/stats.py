"""Confidence intervals for binomial proportions (shared by tables and certificates)."""
from __future__ import annotations

import numpy as np
from scipy.stats import beta

__all__ = ["clopper_pearson"]


def clopper_pearson(successes, trials, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided (1 - alpha) interval for a binomial proportion; arrays broadcast.

    Clopper & Pearson (1934): lower = Beta(alpha/2; k, n-k+1), upper = Beta(1-alpha/2; k+1, n-k).
    """
    k = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
        upper = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return lower, upper
