r"""Minibatch couplings for OT-CFM: exact and entropic optimal transport between two batches.

Conditional flow matching draws the pair :math:`(x_0, x_1)` from a coupling
:math:`\pi` of :math:`p_0` and :math:`q_1`.  The independent coupling gives
the marginals of :mod:`refflow.targets`; OT-CFM (Tong et al. 2023; Pooladian
et al. 2023) instead re-pairs each minibatch by an optimal transport plan for
the squared Euclidean cost

.. math::

    \pi^\star = \arg\min_{\pi \in \Pi(a, b)} \sum_{ij} \pi_{ij} \|x_0^{(i)} - x_1^{(j)}\|^2,
    \qquad \Pi(a, b) = \{\pi \ge 0 : \pi 1 = a,\ \pi^\top 1 = b\},

with uniform weights :math:`a = 1/n`, :math:`b = 1/m`; or its entropic
relaxation (Cuturi 2013), the minimiser of
:math:`\langle \pi, C\rangle - \varepsilon H(\pi)`, of the form
:math:`\pi_{ij} = \exp((f_i + g_j - C_{ij})/\varepsilon)`.

* :func:`exact_plan`: for equal sizes a permutation from
  ``scipy.optimize.linear_sum_assignment``; for unequal sizes the same
  assignment on the batches replicated to ``L = lcm(n, m)`` rows each (the
  transport polytope with integer marginals has integer vertices, so the
  assignment's optimum divided by ``L`` is the exact OT optimum), and
  ``scipy.optimize.linprog`` only when ``L`` would be too large.
* :func:`sinkhorn_plan`: a log-domain Sinkhorn of refflow's own, in
  float64, iterated until the marginals hold to a stated relative tolerance.
  It is written here rather than taken from POT so that the reference has
  no optional dependency, stays finite for small :math:`\varepsilon` (the
  kernel :math:`e^{-C/\varepsilon}` underflows in the usual scaling form,
  the potentials do not) and stops on a criterion the check can quote.
* :func:`ot_pairing`: a re-pairing of a batch for training
  (:func:`refflow.train.train` with ``coupling=``).
* :func:`gaussian_ot_map`: the closed-form OT map between two Gaussians,
  the ground truth of the OT-CFM verification.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from refflow._validation import as_rng, check_points, check_scalar

__all__ = [
    "squared_distances",
    "exact_plan",
    "sinkhorn_plan",
    "plan_cost",
    "ot_pairing",
    "gaussian_ot_map",
]

# Largest replicated assignment (L x L) solved for unequal batch sizes before linprog.
_MAX_REPLICATED = 2048


def squared_distances(x_0, x_1, squared: bool = True) -> np.ndarray:
    r"""The cost matrix :math:`C_{ij} = \|x_0^{(i)} - x_1^{(j)}\|^2` (or the distance with ``squared=False``).

    Computed from the differences, not from :math:`|x|^2 + |y|^2 - 2 x\cdot y`,
    whose cancellation would lose the small costs.
    """
    x_0 = check_points(x_0, "x_0")
    x_1 = check_points(x_1, "x_1", x_0.shape[1])
    cost = np.empty((x_0.shape[0], x_1.shape[0]))
    block = max(1, 2**22 // max(1, x_1.shape[0] * x_0.shape[1]))
    for s in range(0, x_0.shape[0], block):
        diff = x_0[s:s + block, None, :] - x_1[None, :, :]
        cost[s:s + block] = np.einsum("ijk,ijk->ij", diff, diff)
    return cost if squared else np.sqrt(cost)


def plan_cost(plan, cost) -> float:
    r""":math:`\langle \pi, C\rangle = \sum_{ij} \pi_{ij} C_{ij}`."""
    return float(np.sum(np.asarray(plan) * np.asarray(cost)))


def exact_plan(x_0=None, x_1=None, *, cost=None) -> np.ndarray:
    r"""The exact OT plan with uniform weights, shape (n, m), entries summing to 1.

    Give the batches (squared Euclidean cost) or a ``cost`` matrix.  For
    ``n == m`` the plan is a permutation matrix divided by ``n``.
    """
    from scipy.optimize import linear_sum_assignment

    if cost is None:
        cost = squared_distances(x_0, x_1)
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.size == 0 or not np.all(np.isfinite(cost)):
        raise ValueError(f"cost: expected a finite non-empty (n, m) matrix, got shape {cost.shape}")
    n, m = cost.shape
    if n == m:
        rows, cols = linear_sum_assignment(cost)
        plan = np.zeros((n, m))
        plan[rows, cols] = 1.0 / n
        return plan
    big = n * m // math.gcd(n, m)
    if big <= _MAX_REPLICATED:
        rep = np.repeat(np.repeat(cost, big // n, axis=0), big // m, axis=1)
        rows, cols = linear_sum_assignment(rep)
        plan = np.zeros((n, m))
        np.add.at(plan, (rows // (big // n), cols // (big // m)), 1.0 / big)
        return plan
    return _linprog_plan(cost)


def _linprog_plan(cost):
    from scipy.optimize import linprog

    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    res = linprog(cost.ravel(), A_eq=np.vstack([rows, cols]),
                  b_eq=np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)]),
                  bounds=(0, None), method="highs")
    if not res.success:
        raise RuntimeError(f"linprog failed on the OT problem: {res.message}")
    return np.maximum(res.x.reshape(n, m), 0.0)


def _logsumexp(a, axis):
    peak = np.max(a, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    return np.squeeze(peak, axis=axis) + np.log(np.sum(np.exp(a - peak), axis=axis))


def sinkhorn_plan(x_0=None, x_1=None, reg: float = 0.05, *, cost=None, a=None, b=None,
                  tol: float = 1e-12, max_iter: int = 100_000) -> np.ndarray:
    r"""The entropic OT plan :math:`\arg\min_\pi \langle\pi, C\rangle - \varepsilon H(\pi)`, log-domain Sinkhorn.

    Alternates the potential updates

    .. math::

        f_i = \varepsilon \log a_i - \varepsilon \log\sum_j e^{(g_j - C_{ij})/\varepsilon}, \qquad
        g_j = \varepsilon \log b_j - \varepsilon \log\sum_i e^{(f_i - C_{ij})/\varepsilon},

    and returns :math:`\pi_{ij} = e^{(f_i + g_j - C_{ij})/\varepsilon}`.
    After a :math:`g` update the column sums are exact; it stops when the row
    sums hold to ``tol`` relative, :math:`\max_i |\pi 1 - a|_i / a_i \le` ``tol``,
    and warns (RuntimeWarning) when ``max_iter`` iterations did not get there:
    convergence slows as :math:`\varepsilon` falls below the spread of the costs.

    Parameters
    ----------
    x_0, x_1 : arrays (n, d), (m, d), or ``cost`` (n, m)
    reg : float
        :math:`\varepsilon > 0` (POT's ``reg``; TorchCFM's SB-CFM uses :math:`2\sigma^2`).
    a, b : arrays, optional
        Weights (default uniform); they must have the same positive total.
    """
    reg = check_scalar(reg, "reg", low=0.0, low_open=True)
    if cost is None:
        cost = squared_distances(x_0, x_1)
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    a = np.full(n, 1.0 / n) if a is None else np.asarray(a, dtype=np.float64)
    b = np.full(m, 1.0 / m) if b is None else np.asarray(b, dtype=np.float64)
    if a.shape != (n,) or b.shape != (m,) or np.any(a <= 0) or np.any(b <= 0):
        raise ValueError(f"a, b: expected positive weights of shapes ({n},), ({m},), got {a.shape}, {b.shape}")
    log_a, log_b = np.log(a), np.log(b)
    f, g = np.zeros(n), np.zeros(m)
    for it in range(int(max_iter)):
        f = reg * (log_a - _logsumexp((g[None, :] - cost) / reg, axis=1))
        g = reg * (log_b - _logsumexp((f[:, None] - cost) / reg, axis=0))
        if it % 10 == 9 or it == max_iter - 1:
            log_rows = _logsumexp((f[:, None] + g[None, :] - cost) / reg, axis=1)
            miss = float(np.max(np.abs(np.expm1(log_rows - log_a))))
            if miss <= tol:
                break
    else:
        warnings.warn(f"sinkhorn_plan: not converged after max_iter={max_iter} iterations (row sums off by a "
                      f"relative {miss:.3g} > tol={tol!r}); a small reg needs many more", RuntimeWarning,
                      stacklevel=2)
    return np.exp((f[:, None] + g[None, :] - cost) / reg)


def ot_pairing(x_0, x_1, method: str = "exact", reg: float | None = None, rng=None) -> np.ndarray:
    r"""Indices ``j`` re-pairing the batch: row ``i`` of ``x_0`` goes with row ``j[i]`` of ``x_1``.

    ``method="exact"``: the optimal permutation (needs ``n == m``), so the
    batch of :math:`x_1` is kept exactly, only reordered.  ``"sinkhorn"``:
    :math:`j_i` drawn from the row :math:`\pi_{i\cdot}/a_i` of the entropic
    plan at ``reg`` (``rng`` needed), which keeps the batch of :math:`x_0`
    and draws :math:`x_1` from the plan's conditional.
    """
    x_0 = check_points(x_0, "x_0")
    x_1 = check_points(x_1, "x_1", x_0.shape[1])
    if method == "exact":
        if x_0.shape[0] != x_1.shape[0]:
            raise ValueError(f"x_1: expected {x_0.shape[0]} rows like x_0 for an exact pairing, got {x_1.shape[0]}")
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(squared_distances(x_0, x_1))
        j = np.empty(x_0.shape[0], dtype=np.int64)
        j[rows] = cols
        return j
    if method == "sinkhorn":
        if reg is None:
            raise ValueError("reg: expected the entropic regularisation (a positive float) for method='sinkhorn'")
        rng = as_rng(rng)
        plan = sinkhorn_plan(x_0, x_1, reg)
        cdf = np.cumsum(plan / plan.sum(axis=1, keepdims=True), axis=1)
        u = rng.random((x_0.shape[0], 1))
        return np.minimum(np.sum(cdf < u, axis=1), x_1.shape[0] - 1).astype(np.int64)
    raise ValueError(f"method: expected 'exact' or 'sinkhorn', got {method!r}")


def _sqrtm_psd(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def gaussian_ot_map(mean_0, cov_0, mean_1, cov_1):
    r"""The OT map :math:`T(x) = m_1 + A (x - m_0)` from :math:`\mathcal N(m_0, \Sigma_0)` to :math:`\mathcal N(m_1, \Sigma_1)`.

    .. math::

        A = \Sigma_0^{-1/2} \left(\Sigma_0^{1/2} \Sigma_1 \Sigma_0^{1/2}\right)^{1/2} \Sigma_0^{-1/2},

    symmetric positive definite (Brenier's map is the gradient of a convex
    function); for :math:`\Sigma_0 = I`, :math:`A = \Sigma_1^{1/2}`.  The
    displacement interpolation :math:`x_t = (1 - t) x + t T(x)` moves every
    point on a straight line at constant speed.  Returns ``(A, b)`` with
    :math:`T(x) = x A^\top + b` for row vectors.
    """
    m0, m1 = np.asarray(mean_0, float), np.asarray(mean_1, float)
    s0, s1 = np.asarray(cov_0, float), np.asarray(cov_1, float)
    r0 = _sqrtm_psd(s0)
    r0_inv = np.linalg.inv(r0)
    A = r0_inv @ _sqrtm_psd(r0 @ s1 @ r0) @ r0_inv
    A = 0.5 * (A + A.T)
    return A, m1 - m0 @ A.T
