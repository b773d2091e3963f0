"""Error measures and thresholds shared by the checks.

Tolerances follow from the method (DESIGN.md): exact comparisons use a
relative error, Monte-Carlo comparisons a z-score with a Bonferroni-corrected
threshold, convergence checks a fitted slope.
"""
from __future__ import annotations

import numpy as np
from scipy import stats as _stats

from refflow._validation import as_rng

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


def energy_distance_test(X, Y, n_permutations: int, rng) -> tuple[float, float]:
    r"""Energy distance between samples ``X`` and ``Y`` and its permutation critical value.

    .. math::

        \mathcal E = \frac{2}{nm}\sum_{i,j}\|X_i - Y_j\| - \frac{1}{n^2}\sum_{i,i'}\|X_i - X_{i'}\|
                    - \frac{1}{m^2}\sum_{j,j'}\|Y_j - Y_{j'}\|

    is 0 exactly when the distributions agree.  Its null distribution comes
    from relabelling the pooled sample ``n_permutations`` times; all
    relabellings are evaluated at once as one matrix product ``D S`` with the
    pairwise distance matrix ``D`` and a 0/1 membership matrix ``S``.

    Returns
    -------
    statistic : float
    critical : float
        The largest permuted statistic: rejecting when ``statistic`` exceeds it
        is a test at level ``1 / (n_permutations + 1)``.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    Z = np.concatenate([X, Y])
    N, n, m = Z.shape[0], X.shape[0], Y.shape[0]
    sq = np.sum(Z**2, axis=1)
    D = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (Z @ Z.T), 0.0))
    np.fill_diagonal(D, 0.0)
    rng = as_rng(rng)
    B = int(n_permutations)
    # column 0: the observed split; the others: each column shuffled independently
    S = np.zeros((N, B + 1))
    S[:n, :] = 1.0
    S[:, 1:] = rng.permuted(S[:, 1:], axis=0)
    DS = D @ S
    total = D.sum()
    xx = np.einsum("ib,ib->b", S, DS)          # s^T D s
    row = DS.sum(axis=0)                       # 1^T D s
    xy = row - xx
    yy = total - 2.0 * row + xx
    stats = 2.0 * xy / (n * m) - xx / n**2 - yy / m**2
    return float(stats[0]), float(stats[1:].max())


# Relabellings of the energy test: memory grows like (2 n_energy) x permutations.
_MAX_PERMUTATIONS = 29999


def standard_normal_z(eps):
    r"""z-scores of the mean and the variance of each column of ``eps`` (m, d) against N(0, 1).

    :math:`z_{mean} = \sqrt{m}\,|\bar\varepsilon|` and
    :math:`z_{var} = |\overline{\varepsilon^2} - 1| / \sqrt{2/m}`
    (:math:`\operatorname{Var}\varepsilon^2 = 2` for a standard normal).
    Returns ``(z_mean, z_var)``, each of shape (d,).
    """
    eps = np.asarray(eps, dtype=np.float64)
    m = eps.shape[0]
    return np.abs(eps.mean(axis=0)) * np.sqrt(m), np.abs((eps**2).mean(axis=0) - 1.0) / np.sqrt(2.0 / m)
