"""Value checks of the mixture targets: log-densities far from the modes, and full second moments of samples.

``targets.continuity`` and ``targets.score_divergence`` hold the closed forms
to each other (and to autograd); these hold them to independent formulas:

* :math:`\\log p_t(x) = \\log \\sum_k w_k \\mathcal N(x \\mid \\alpha_t m_k, \\alpha_t^2 C_k + \\sigma_t^2 I)`
  (eq 16) against ``scipy.stats.multivariate_normal`` and
  ``scipy.special.logsumexp``, at points up to :math:`|x| = 10^3`, where every
  component's density underflows and only a shifted log-sum-exp survives;
* every second moment :math:`\\mathbb E[x_i x_j]` of samples of :math:`q_1` and
  :math:`p_t`, off-diagonal ones included: a covariance rotated the wrong way
  (:math:`V^\\top \\Lambda V` for :math:`V \\Lambda V^\\top`) has the same
  diagonal, so only the off-diagonal moments see it;
* the component frequencies of a weighted point set (an :class:`~refflow.targets.Empirical`).
"""
from __future__ import annotations

import numpy as np
from scipy import special, stats as sps

from refflow.paths import OTPath, VPPath
from refflow.stats import bonferroni_z
from refflow.targets import Empirical, random_mixture
from refflow.verify.checks.paths_values import row_rel_err
from refflow.verify.registry import Outcome, register

EXACT_ROW_TOL = 1e-10


def _component_log_densities(target, path, x, t):
    alpha, sigma = float(path.alpha(t)), float(path.sigma(t))
    d = target.dim
    return np.stack([
        np.log(w) + sps.multivariate_normal(alpha * m, alpha**2 * C + sigma**2 * np.eye(d)).logpdf(x)
        for w, m, C in zip(target.weights, target.means, target.covariances)
    ], axis=1)


def _far_points(target, rng, n):
    x = target.sample(n, rng)
    # directions out to |x| = 1e3: every component density underflows in float64 there
    x[: n // 2] *= np.logspace(0.5, 3.0, n // 2)[:, None] / np.maximum(1.0, np.linalg.norm(x[: n // 2], axis=1))[:, None]
    return x


@register("targets.log_prob_far", equations="16", quick=True)
def check_log_prob_far(rng, quick):
    n = 200
    errors, control = {}, []
    for d in (2, 3):
        target = random_mixture(d, 4, rng, mean_scale=1.5)
        x = _far_points(target, rng, n)
        for path, t in ((None, 1.0), (OTPath(0.05), 0.4), (VPPath(), 0.7)):
            comp = _component_log_densities(target, path or OTPath(), x, t)
            ref = special.logsumexp(comp, axis=1)
            got = target.log_prob(x) if path is None else target.marginal(path).log_prob(x, t)
            errors[f"d={d} {path!r} t={t}"] = row_rel_err(got, ref)
            with np.errstate(divide="ignore"):
                # Planted bug: the log-sum-exp without its shift (log of a sum of underflowed exps).
                control.append(row_rel_err(np.log(np.sum(np.exp(comp), axis=1)), ref))
    return Outcome(
        compared="log q_1 and log p_t (OT t = 0.4, VP t = 0.7) of full-covariance mixtures, d = 2, 3, at points "
                 "out to |x| = 1e3 vs scipy.stats.multivariate_normal + scipy.special.logsumexp",
        error=max(errors.values()), tolerance=EXACT_ROW_TOL,
        why="two float64 evaluations of the same closed form (eigen-decomposition vs SciPy's Cholesky), per "
            "point relative to max(1, |log p|)",
        control="the log-sum-exp without its shift by the largest term", control_error=max(control),
        details=errors,
    )


def _second_moment_z(x, mean, second):
    """z-scores of the sample mean and every sample second moment E[x_i x_j] (i <= j)."""
    n, d = x.shape
    i, j = np.triu_indices(d)
    prod = x[:, i] * x[:, j]
    z_mean = (x.mean(0) - mean) / (x.std(0) / np.sqrt(n))
    z_second = (prod.mean(0) - second[i, j]) / (prod.std(0) / np.sqrt(n))
    return np.concatenate([z_mean, z_second])


def _exact_moments(target, alpha, sigma):
    d = target.dim
    mean = alpha * target.weights @ target.means
    second = sum(w * alpha**2 * (C + np.outer(m, m)) for w, m, C in
                 zip(target.weights, target.means, target.covariances)) + sigma**2 * np.eye(d)
    return mean, second


def _transposed_rotation_samples(target, n, rng):
    """Planted bug: each component's N(0, Lambda) draw rotated by V^T instead of V."""
    k = rng.choice(target.n_components, size=n, p=target.weights)
    x = np.empty((n, target.dim))
    for c, (m, C) in enumerate(zip(target.means, target.covariances)):
        lam, V = np.linalg.eigh(C)
        rows = k == c
        x[rows] = m + (rng.standard_normal((int(rows.sum()), target.dim)) * np.sqrt(lam)) @ V
    return x


@register("targets.second_moments", equations="16", quick=True)
def check_sampling_covariance(rng, quick):
    # n is sized so that a transposed rotation (same diagonal, off-diagonal moments
    # of the wrong sign) sits far beyond the threshold: see details["control_z"].
    n = 20_000 if quick else 100_000
    target = random_mixture(3, 3, rng, mean_scale=0.5)
    path = VPPath()
    zs = []
    for t in (1.0, 0.6):
        mean, second = _exact_moments(target, float(path.alpha(t)), float(path.sigma(t)))
        x = target.sample(n, rng) if t == 1.0 else target.marginal(path).sample(n, t, rng)
        zs.append(_second_moment_z(x, mean, second))
    mean, second = _exact_moments(target, 1.0, 0.0)
    control = np.abs(_second_moment_z(_transposed_rotation_samples(target, n, rng), mean, second)).max()
    # a weighted point set: component frequencies against the weights (binomial z-scores)
    w = np.array([0.05, 0.15, 0.3, 0.5])
    points = Empirical(np.arange(8.0).reshape(4, 2), weights=w)
    draws = points.sample(n, rng)[:, 0] / 2.0
    freq = np.array([(draws == c).mean() for c in range(4)])
    zs.append((freq - w) / np.sqrt(w * (1 - w) / n))
    z = np.concatenate(zs)
    return Outcome(
        compared=f"mean and every second moment E[x_i x_j] of {n} samples of a full-covariance mixture (q_1, and "
                 "p_t of the VP path at t = 0.6) vs exact; component frequencies of a weighted Empirical vs weights",
        error=float(np.abs(z).max()), tolerance=bonferroni_z(z.size),
        why="z-scores with the sample standard error, Bonferroni threshold at family-wise level 1e-3",
        control="components sampled with their eigenbasis transposed (covariance V^T Lambda V)",
        control_error=float(control), details={"n": n, "control_z": float(control)},
    )


@register("targets.monte_carlo_exact", equations="16, 19, 31", quick=True)
def check_monte_carlo_exact(rng, quick):
    """monte_carlo_velocity over a point set is that point set's exact marginal field."""
    from refflow.targets import monte_carlo_velocity

    n_points, n, d = 40, 64, 2
    points = 1.5 * rng.standard_normal((n_points, d))
    errors, control = {}, []
    for path in (OTPath(0.05), VPPath()):
        t = rng.uniform(0.05, 0.95, n)
        m = Empirical(points).marginal(path)
        x = m.sample(n, t, rng)
        u_hat, se, ess = monte_carlo_velocity(path, points, x, t)
        w = m.responsibilities(x, t)                                        # (n, N), the same weights
        u_cond = np.stack([path.conditional_velocity(x, np.broadcast_to(p, x.shape), t) for p in points], axis=1)
        se_ref = np.sqrt(np.einsum("nj,njd->nd", w**2, (u_cond - u_hat[:, None, :]) ** 2))
        errors[repr(path)] = max(row_rel_err(u_hat, m.velocity(x, t)), row_rel_err(se, se_ref),
                                 row_rel_err(ess, 1.0 / np.sum(w**2, axis=1)))
        # Planted bug: the self-normalised weights with sigma_t in place of sigma_t^2.
        sigma = np.asarray(path.sigma(t))[:, None]
        alpha = np.asarray(path.alpha(t))[:, None, None]
        log_w = -0.5 * np.sum((x[:, None, :] - alpha * points[None]) ** 2, axis=2) / sigma
        w_bad = np.exp(log_w - log_w.max(axis=1, keepdims=True))
        w_bad /= w_bad.sum(axis=1, keepdims=True)
        control.append(row_rel_err(np.einsum("nj,njd->nd", w_bad, u_cond), m.velocity(x, t)))
    return Outcome(
        compared="targets.monte_carlo_velocity with the 40 points of an Empirical target as its samples vs that "
                 "target's closed-form marginal field (eq 19), its weights' standard error and effective sample size",
        error=max(errors.values()), tolerance=EXACT_ROW_TOL,
        why="over the same points the self-normalised estimator is the exact marginal field of the point set: "
            "only rounding separates them",
        control="importance weights with sigma_t in place of sigma_t^2", control_error=min(control),
        details=errors,
    )
