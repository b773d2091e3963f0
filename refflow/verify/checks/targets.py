"""Checks of the closed-form marginal path and field of Gaussian mixtures (eq 11, 16, 19)."""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad

from refflow import autodiff
from refflow.paths import OTPath, VPPath
from refflow.plotting import plot_marginal_fields, plot_z_histogram
from refflow.targets import eight_gaussians, monte_carlo_velocity, random_mixture
from refflow.verify.checks.paths import all_paths
from refflow.verify.registry import Outcome, register
from refflow.stats import EXACT_TOL, bonferroni_z, rel_err

MIN_ESS = 50.0
"""Points whose importance-sampling effective sample size is below this are not
tested: the delta-method standard error is unreliable there."""


def cases(rng, dims=(2, 8)):
    """(label, target) pairs: the 2-D eight Gaussians and a random full-covariance mixture per dim."""
    out = [("eight-gaussians", eight_gaussians())]
    out += [(f"random d={d}", random_mixture(d, 4, rng, mean_scale=1.5)) for d in dims if d != 2]
    return out


class _WrongField:
    """Planted bug: the marginal field built without the sigma*sigma' term."""

    def __init__(self, marginal):
        self.m = marginal

    def velocity(self, x, t):
        real_sds = self.m.path._sigma_d_sigma
        self.m.path._sigma_d_sigma = lambda s: 0.0 * s
        try:
            return self.m.velocity(x, t)
        finally:
            self.m.path._sigma_d_sigma = real_sds


def _z_scores(marginal, rng, n_points, n_samples, field=None):
    t = rng.uniform(0.05, 0.8, n_points)
    x = marginal.sample(n_points, t, rng)
    x_1 = marginal.target.sample(n_samples, rng)
    u_mc, se, ess = monte_carlo_velocity(marginal.path, x_1, x, t)
    keep = ess >= MIN_ESS
    u = (field or marginal).velocity(x[keep], t[keep])
    z = (u - u_mc[keep]) / se[keep]
    return z, int(keep.sum()), float(np.median(ess))


@register("targets.marginal_monte_carlo", equations="16, 19", quick=False)
def check_marginal_monte_carlo(rng, quick):
    n_points, n_samples = (12, 20_000) if quick else (24, 50_000)
    zs, tested, details = [], 0, {}
    control_z = []
    for label, target in cases(rng):
        for path in all_paths():
            m = target.marginal(path)
            z, kept, ess = _z_scores(m, rng, n_points, n_samples)
            zs.append(z.ravel())
            tested += kept
            details[f"{label} / {path!r}"] = {"max|z|": float(np.abs(z).max()) if z.size else 0.0,
                                               "points": kept, "median ESS": ess}
            if isinstance(path, VPPath):
                cz, _, _ = _z_scores(m, rng, n_points, n_samples, field=_WrongField(m))
                control_z.append(np.abs(cz).max())
    z_all = np.concatenate(zs)
    threshold = bonferroni_z(z_all.size)
    return Outcome(
        compared="closed-form marginal field (eq 19) vs the self-normalised Monte-Carlo estimate of eq 19 "
                 f"from {n_samples} data samples, every path, 2-D and 8-D mixtures, x ~ p_t, t ~ U(0.05, 0.8)",
        error=float(np.abs(z_all).max()), tolerance=threshold,
        measure='max |z| (Bonferroni threshold)',
        why=f"|z| of {z_all.size} coordinates; Bonferroni threshold at family-wise level 1e-3 "
            f"(points with effective sample size < {MIN_ESS:g} skipped)",
        control="marginal field with the sigma_t sigma_t' term dropped (VP path)",
        control_error=float(max(control_z)), details=details,
        figure=plot_z_histogram(z_all, threshold, "closed-form u_t vs Monte-Carlo eq 19"),
    )


def continuity_residual(marginal, x, t, velocity=None):
    r"""Scaled residual of eq 11, d/dt log p_t + div u_t + grad log p_t . u_t, all by autograd."""
    velocity = velocity or marginal.velocity
    dlogp_dt = elementwise_grad(lambda s: marginal.log_prob(x, s))(t)
    score = elementwise_grad(lambda z: anp.sum(marginal.log_prob(z, t)))(x)
    u = velocity(x, t)
    div = autodiff.divergence(lambda z: velocity(z, t), x)
    transport = np.sum(score * u, axis=1)
    residual = dlogp_dt + div + transport
    scale = np.abs(dlogp_dt) + np.abs(div) + np.abs(transport)
    return float(np.max(np.abs(residual) / scale))


@register("targets.continuity", equations="11, 16, 19", quick=True)
def check_continuity(rng, quick):
    n = 16 if quick else 48
    errors = {}
    for label, target in cases(rng):
        for path in all_paths():
            m = target.marginal(path)
            t = rng.uniform(0.0, 1.0, n)
            x = m.sample(n, t, rng)
            errors[f"{label} / {path!r}"] = continuity_residual(m, x, t)
    m = cases(rng)[1][1].marginal(VPPath())
    t = rng.uniform(0.0, 1.0, n)
    x = m.sample(n, t, rng)
    control = continuity_residual(m, x, t, velocity=_WrongField(m).velocity)
    return Outcome(
        compared="residual of the continuity equation (eq 11) in the form "
                 "d/dt log p_t + div u_t + u_t . grad log p_t = 0, every derivative by autograd of the "
                 "closed-form log p_t and u_t, relative to the size of its terms",
        error=max(errors.values()), tolerance=EXACT_TOL,
        measure='scaled residual of eq 11',
        why="an exact identity; autograd derivatives of float64 closed forms",
        control="marginal field with the sigma_t sigma_t' term dropped",
        control_error=control, details=errors,
        figure=plot_marginal_fields(eight_gaussians().marginal(OTPath())),
    )


def _covariance_term_dropped(marginal, x, t):
    """Planted bug: div u = sum_k r_k tr(A_k), forgetting that the responsibilities depend on x."""
    core, path = marginal._core, marginal.path
    tt = np.broadcast_to(np.asarray(t, float), (x.shape[0],)).reshape(-1, 1, 1)
    c = path._sigma_d_sigma(tt) + path._alpha(tt) * path._d_alpha(tt) * core.eigvals[None]
    s = path._alpha(tt) ** 2 * core.eigvals[None] + path._sigma(tt) ** 2
    return np.sum(marginal.responsibilities(x, t) * np.sum(c / s, axis=2), axis=1)


@register("targets.score_divergence", equations="11, 14, 19", quick=True)
def check_score_divergence(rng, quick):
    n = 16 if quick else 48
    errors = {}
    controls = []
    for label, target in cases(rng):
        for path in all_paths():
            m = target.marginal(path)
            t = rng.uniform(0.0, 1.0, n)
            t[:2] = (0.0, 1.0)
            x = m.sample(n, t, rng)
            score_ad = elementwise_grad(lambda z: anp.sum(m.log_prob(z, t)))(x)
            div_ad = autodiff.divergence(lambda z: m.velocity(z, t), x)
            errors[f"{label} / {path!r}"] = max(rel_err(m.score(x, t), score_ad), rel_err(m.divergence(x, t), div_ad))
            if label == "eight-gaussians":
                controls.append(rel_err(_covariance_term_dropped(m, x, t), div_ad))
    return Outcome(
        compared="closed-form score vs autograd gradient of log p_t; closed-form divergence vs the trace of "
                 "the autograd Jacobian of u_t (t = 0 and t = 1 included)",
        error=max(errors.values()), tolerance=EXACT_TOL,
        measure='relative error, max|a - b| / max|b|',
        why="exact identities evaluated in float64",
        control="divergence without the responsibility (covariance) term sum_k r_k (s_k - s).(u_k - u)",
        control_error=float(min(controls)), details=errors,
    )


@register("targets.sampling", equations="16", quick=True)
def check_sampling(rng, quick):
    """Sample means of the mixture and of p_t against their exact values (z-test)."""
    n = 50_000 if quick else 200_000
    target = random_mixture(3, 4, rng, mean_scale=1.5)
    path = VPPath()
    zs, control = [], []
    for t in (0.0, 0.5, 1.0):
        m = target.marginal(path)
        x = m.sample(n, t, rng)
        alpha, sigma = path.alpha(t), path.sigma(t)
        mean = alpha * target.weights @ target.means
        second = sum(w * (alpha**2 * (C + np.outer(mu, mu))) for w, mu, C in
                     zip(target.weights, target.means, target.covariances)) + sigma**2 * np.eye(3)
        var = np.diag(second) - mean**2
        zs.append((x.mean(0) - mean) / np.sqrt(var / n))
        # second moments: z-test on x_i^2 with its sample standard error
        sq = x**2
        zs.append((sq.mean(0) - np.diag(second)) / (sq.std(0) / np.sqrt(n)))
        # Planted bug: components drawn with their variances used as standard deviations.
        k = target.sample_with_labels(n, rng)[2]
        wrong = alpha * (target.means[k] + np.einsum("nij,nj->ni", target.covariances[k], rng.standard_normal((n, 3)))) \
            + sigma * rng.standard_normal((n, 3))
        control.append(np.abs((wrong**2).mean(0) - np.diag(second)).max() / (sq.std(0).max() / np.sqrt(n)))
    z = np.concatenate(zs)
    return Outcome(
        compared="mean and second moment of samples of q_1 and p_t (VP path, t = 0, 0.5, 1) vs exact",
        error=float(np.abs(z).max()), tolerance=bonferroni_z(z.size),
        measure='max |z| (Bonferroni threshold)',
        why="z-scores of sample moments, Bonferroni threshold at family-wise level 1e-3",
        control="components sampled with C_k in place of C_k^(1/2)", control_error=float(max(control)),
        details={"n": n},
    )
