"""Error measures and thresholds shared by the checks.

Tolerances follow from the method (DESIGN.md): exact comparisons use a
relative error, Monte-Carlo comparisons a z-score with a Bonferroni-corrected
threshold, convergence checks a fitted slope.
"""
from __future__ import annotations

import numpy as np
from scipy import stats as _stats

EXACT_TOL = 1e-10
"""Relative error allowed between two float64 evaluations of the same exact quantity."""

FAMILY_ALPHA = 1e-3
"""Family-wise false-alarm rate of a Monte-Carlo check."""


def rel_err(a, b) -> float:
    """``max|a - b| / max|b|``: the error relative to the scale of the reference ``b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, np.finfo(float).tiny)
    return float(np.max(np.abs(a - b))) / scale if a.size else 0.0


def bonferroni_z(m: int, alpha: float = FAMILY_ALPHA) -> float:
    """Two-sided z threshold for ``m`` simultaneous comparisons at family-wise level ``alpha``.

    Never below 4 (the DESIGN.md rule), so small families are not held to a
    looser standard.
    """
    return max(4.0, float(_stats.norm.isf(alpha / (2.0 * max(int(m), 1)))))


def fit_slope(x, y) -> float:
    """Least-squares slope of log(y) against log(x)."""
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])
