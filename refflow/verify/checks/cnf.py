r"""Checks of the CNF log-likelihood (eq 11-14) and of its discrete origin (eq 5-10).

Ground truth:

* the closed-form marginal :math:`\log p_t` of a Gaussian mixture on every
  affine path (eq 16, 19): eq 14 driven by the closed-form marginal field
  must reproduce :math:`\log p_1`;
* affine fields :math:`u_t(x) = A x + b(t)`, whose flow is a matrix
  exponential and whose pushforward of :math:`\mathcal N(0, I)` is the Gaussian
  :math:`\mathcal N(\mu_1, e^{A} e^{A^\top})` (eq 2);
* for Hutchinson's estimator, the exact moments of the quadratic form
  :math:`\varepsilon^\top M \varepsilon`;
* for the continuous limit, the exact log-determinants of the Euler map's
  residual layers (eq 5-6), which must approach eq 14 at order 1.

Each check runs a planted wrong variant (negative control) through the
same comparison: the divergence's sign flipped, the time direction reversed,
a Hutchinson probe redrawn at every evaluation, the log-determinant's sign
flipped.
"""
from __future__ import annotations

import itertools

import autograd.numpy as anp
import numpy as np
import scipy.linalg

from refflow import autodiff, cnf, targets
from refflow.paths import OTPath
from refflow.verify.checks.paths import all_paths
from refflow.plotting import density_grid, plot_log_density_panels
from refflow.verify.registry import Outcome, register
from refflow.stats import bonferroni_z

__all__ = [
    "ODE_TOL",
    "ODE_BOUND",
    "AffineField",
    "DiagonalField",
    "TimeLinearField",
    "quadratic_form_moments",
    "variance_z",
    "RedrawnProbe",
]

ODE_TOL = 1e-10
"""rtol = atol of the DOP853 solves whose results are compared with closed forms."""

ODE_BOUND = 1e-6
r"""Allowed absolute error in :math:`\log p_1` of those solves.

DOP853 keeps every step's local error below ``atol + rtol |y|`` (here about
1e-9 for the augmented states met); the global error is the sum of the local
errors carried to the end by the linearised flow, which magnifies them by at
most :math:`\exp\int_0^1 \|J_{u_t}\| dt` (below 1e3 on these problems) and
adds them over the steps (a few hundred).  1e-6 = 1e-9 x 1e3 covers that;
the errors measured are near 1e-11.
"""

_PROBES = ("rademacher", "gaussian")


# ---------------------------------------------------------------------------
# Ground-truth fields
# ---------------------------------------------------------------------------


class AffineField:
    r"""The field :math:`u_t(x) = A x + b_0 + t\, b_1` with a constant matrix :math:`A`.

    Its flow over :math:`[t_0, t_1]` is exact through the matrix exponential
    of the generator of :math:`(x, t, 1)`:

    .. math::

        \frac{d}{dt}\begin{pmatrix} x \\ t \\ 1 \end{pmatrix}
        = \begin{pmatrix} A & b_1 & b_0 \\ 0 & 0 & 1 \\ 0 & 0 & 0 \end{pmatrix}
          \begin{pmatrix} x \\ t \\ 1 \end{pmatrix},

    and the pushforward of :math:`\mathcal N(0, I)` at :math:`t = 1` is
    :math:`\mathcal N(\psi_1(0),\, e^{A} e^{A^\top})`, whose log-density is the
    change of variables (eq 2) with :math:`\log|\det e^{A}| = \operatorname{tr} A`.
    ``__call__`` is written with ``autograd.numpy`` so every divergence mode
    applies; ``divergence`` is the exact :math:`\operatorname{tr} A`.
    """

    def __init__(self, A, b0, b1):
        self.A = np.asarray(A, dtype=np.float64)
        self.b0 = np.asarray(b0, dtype=np.float64)
        self.b1 = np.asarray(b1, dtype=np.float64)
        d = self.A.shape[0]
        self.d = d
        G = np.zeros((d + 2, d + 2))
        G[:d, :d] = self.A
        G[:d, d] = self.b1
        G[:d, d + 1] = self.b0
        G[d, d + 1] = 1.0
        self._generator = G

    def __call__(self, t, x):
        return anp.dot(x, self.A.T) + self.b0 + t * self.b1

    def divergence(self, t, x):
        return np.full(np.shape(x)[0], np.trace(self.A))

    def flow(self, x, t0, t1):
        r"""The exact flow map :math:`\psi_{t_0 \to t_1}(x)`."""
        n = x.shape[0]
        E = scipy.linalg.expm(self._generator * (t1 - t0))
        z = np.concatenate([x, np.full((n, 1), t0), np.ones((n, 1))], axis=1)
        return (z @ E.T)[:, : self.d]

    def log_prob_1(self, x):
        r""":math:`\log p_1(x)` of the Gaussian pushforward of :math:`\mathcal N(0, I)`."""
        mean = self.flow(np.zeros((1, self.d)), 0.0, 1.0)[0]
        E = scipy.linalg.expm(self.A)
        return _gaussian_log_prob(x, mean, E @ E.T)


class DiagonalField:
    r"""The time-dependent diagonal field :math:`u_t(x) = (c_0 + t\, c_1) \odot x`.

    Flow :math:`x_1 = e^{c_0 + c_1/2} \odot x_0`; pushforward of
    :math:`\mathcal N(0, I)`: :math:`\mathcal N(0, \operatorname{diag}(e^{2 c_0 + c_1}))`.
    """

    def __init__(self, c0, c1):
        self.c0 = np.asarray(c0, dtype=np.float64)
        self.c1 = np.asarray(c1, dtype=np.float64)
        self.d = self.c0.shape[0]

    def __call__(self, t, x):
        return (self.c0 + t * self.c1) * x

    def divergence(self, t, x):
        return np.full(np.shape(x)[0], np.sum(self.c0 + t * self.c1))

    def flow(self, x, t0, t1):
        return np.exp(self.c0 * (t1 - t0) + 0.5 * self.c1 * (t1**2 - t0**2)) * x

    def log_prob_1(self, x):
        return _gaussian_log_prob(x, np.zeros(self.d), np.diag(np.exp(2.0 * self.c0 + self.c1)))


class TimeLinearField:
    r"""The linear field :math:`u_t(x) = (A_0 + t A_1)\, x`, Jacobian independent of :math:`x`.

    Along any trajectory :math:`\int_0^1 J\, dt = M = A_0 + A_1/2`, and any
    Runge-Kutta method of order >= 2 integrates the (linear in t) divergence
    exactly.  With a probe held fixed along the trajectory, Hutchinson's
    estimate of :math:`\int_0^1 \nabla\cdot u_t\, dt` is therefore exactly
    :math:`\varepsilon^\top M \varepsilon`: its distribution is known.
    """

    def __init__(self, A0, A1):
        self.A0 = np.asarray(A0, dtype=np.float64)
        self.A1 = np.asarray(A1, dtype=np.float64)
        self.M = self.A0 + 0.5 * self.A1

    def __call__(self, t, x):
        return anp.dot(x, (self.A0 + t * self.A1).T)

    def jacobian(self, t):
        return self.A0 + t * self.A1


def _gaussian_log_prob(x, mean, cov):
    L = np.linalg.cholesky(cov)
    z = scipy.linalg.solve_triangular(L, (x - mean).T, lower=True)
    d = mean.shape[0]
    return -0.5 * np.sum(z * z, axis=0) - np.sum(np.log(np.diag(L))) - 0.5 * d * np.log(2.0 * np.pi)


# ---------------------------------------------------------------------------
# Moments of Hutchinson's quadratic form
# ---------------------------------------------------------------------------


def quadratic_form_moments(M, probe):
    r"""Mean, variance and 4th central moment of :math:`Q = \varepsilon^\top M \varepsilon`.

    Gaussian probes: with :math:`\lambda` the eigenvalues of
    :math:`S = (M + M^\top)/2`, the cumulants are
    :math:`\kappa_r = 2^{r-1}(r-1)! \sum_i \lambda_i^r`, so
    :math:`\operatorname{Var} Q = 2\|S\|_F^2` and
    :math:`\mu_4 = \kappa_4 + 3\kappa_2^2`.  Rademacher probes: the exact
    moments by enumerating all :math:`2^d` sign vectors (``d <= 16``); the
    variance equals :math:`2\|S\|_F^2 - 2\sum_i M_{ii}^2`.
    """
    M = np.asarray(M, dtype=np.float64)
    d = M.shape[0]
    if probe == "gaussian":
        lam = np.linalg.eigvalsh(0.5 * (M + M.T))
        k2 = 2.0 * np.sum(lam**2)
        k4 = 48.0 * np.sum(lam**4)
        return float(np.trace(M)), float(k2), float(k4 + 3.0 * k2**2)
    if d > 16:
        raise ValueError(f"M: exact Rademacher moments enumerate 2^d sign vectors, expected d <= 16, got {d}")
    signs = np.array(list(itertools.product((-1.0, 1.0), repeat=d)))
    q = np.einsum("ki,ij,kj->k", signs, M, signs)
    mean = q.mean()
    return float(mean), float(np.mean((q - mean) ** 2)), float(np.mean((q - mean) ** 4))


def variance_z(samples, var, mu4):
    r"""z-score of the unbiased sample variance of ``samples`` against ``var``.

    .. math::

        \operatorname{Var}(s^2) = \frac{1}{N}\Big(\mu_4 - \frac{N-3}{N-1}\sigma^4\Big),
        \qquad z = \frac{s^2 - \sigma^2}{\sqrt{\operatorname{Var}(s^2)}},

    asymptotically standard normal (central limit theorem for :math:`s^2`).
    """
    samples = np.ravel(samples)
    N = samples.size
    s2 = samples.var(ddof=1)
    var_s2 = (mu4 - (N - 3) / (N - 1) * var**2) / N
    return float((s2 - var) / np.sqrt(var_s2))


class RedrawnProbe:
    r"""Negative control: a Hutchinson divergence that draws a fresh probe at every evaluation.

    Used as ``divergence=RedrawnProbe(field, probe, rng)``.  Each value is
    still unbiased for :math:`\nabla\cdot u_t`, but the integral along a
    trajectory is no longer :math:`\varepsilon^\top M \varepsilon` for one
    :math:`\varepsilon`: the independent errors of the evaluations average
    out, so its variance is far below :math:`\operatorname{Var}(\varepsilon^\top M\varepsilon)`
    (and an adaptive solver meets a right-hand side that changes at every call).
    """

    def __init__(self, field, probe, rng):
        self.field, self.probe, self.rng = field, probe, rng

    def __call__(self, t, x):
        est, _, _ = cnf.hutchinson_divergence(self.field, t, x, self.rng, n_probes=1, probe=self.probe)
        return est


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------


class _FlippedDivergence(cnf.MarginalField):
    """Negative control: the marginal field with its divergence's sign flipped."""

    def divergence(self, t, x):
        return -super().divergence(t, x)

    def value_and_divergence(self, t, x):
        u, div = super().value_and_divergence(t, x)
        return u, -div


def _closed_form_errors(target, x_1, paths, wrap=cnf.marginal_field):
    """Max |log p_1 (eq 14) - closed form| per path; ``wrap`` builds the field from the marginal."""
    errors, nfe = {}, {}
    for path in paths:
        marginal = target.marginal(path)
        field = wrap(marginal)
        res = cnf.log_prob(field, x_1, method="DOP853", rtol=ODE_TOL, atol=ODE_TOL)
        errors[repr(path)] = float(np.max(np.abs(res.log_p - marginal.log_prob(x_1, 1.0))))
        nfe[repr(path)] = res.nfe
    return errors, nfe


@register("cnf.closed_form_likelihood", "14, 16, 19", quick=True)
def check_closed_form_likelihood(rng, quick):
    target = targets.random_mixture(2, 3, rng)
    x_1 = np.concatenate([target.sample(6, rng), 2.0 * rng.standard_normal((2, 2))])
    paths = all_paths()
    # --quick: OT (p_0 = N(0, I) exactly), VE and VP (p_0 only close to it).
    errors, nfe = _closed_form_errors(target, x_1, [paths[0], paths[2], paths[3]] if quick else paths)
    # The control on two paths (OT and VE: standard and non-standard p_0) is enough to show it is caught.
    control, _ = _closed_form_errors(target, x_1, [paths[0], paths[2]], wrap=_FlippedDivergence)
    return Outcome(
        compared="log p_1(x_1) by eq 14 (DOP853, rtol = atol = 1e-10) driven by the closed-form marginal "
        "field of a random 2-D mixture, vs the closed-form marginal log p_1, on every path (--quick: OT, VE, VP) "
        "(base density: the marginal's own p_0, which is N(0, I) except on VE/VP)",
        error=max(errors.values()),
        measure='max |log p - exact log p| (nats)',
        tolerance=ODE_BOUND,
        why="an ODE error: local tolerance 1e-10, magnified by the flow at most 1e3 and summed over "
        "the steps (see ODE_BOUND)",
        control="the divergence with its sign flipped (d log p/dt = +div u)",
        control_error=min(control.values()),
        details={"max |error| per path": errors, "nfe per path": nfe, "control |error| per path": control},
        figure=_likelihood_heat_map(),
    )


def _likelihood_heat_map(n=30, lim=6.5):
    """CNF log p_1 (eq 14) of the eight Gaussians on a grid beside the closed form."""
    marginal = targets.eight_gaussians().marginal(OTPath())
    X, Y, truth = density_grid(lambda p: marginal.log_prob(p, 1.0), lim, n)
    grid = np.stack([X.ravel(), Y.ravel()], axis=1)
    res = cnf.log_prob(cnf.marginal_field(marginal), grid, method="DOP853", rtol=1e-6, atol=1e-6)
    return plot_log_density_panels(X, Y, [("CNF log p_1 (eq 14, DOP853)", res.log_p.reshape(X.shape)),
                                          ("closed-form log p_1 (eq 16)", truth)])


def _linear_fields(rng):
    d = 3
    A = 0.6 * rng.standard_normal((d, d))
    return {
        "affine (constant A, b(t) = b0 + t b1)": AffineField(A, rng.standard_normal(d), rng.standard_normal(d)),
        "diagonal A(t) = c0 + t c1": DiagonalField(np.array([0.5, -0.8, 0.2]), np.array([-1.0, 0.6, 1.5])),
    }


@register("cnf.linear_pushforward", "2, 8-10, 14", quick=True)
def check_linear_pushforward(rng, quick):
    fields = _linear_fields(rng)
    errors, control = {}, {}
    for name, field in fields.items():
        x_0 = rng.standard_normal((16, field.d))
        x_1 = field.flow(x_0, 0.0, 1.0)
        truth = field.log_prob_1(x_1)
        for div in ("exact", "autograd"):
            res = cnf.log_prob(field, x_1, divergence=div, method="DOP853", rtol=ODE_TOL, atol=ODE_TOL)
            errors[f"{name}, {div}"] = max(float(np.max(np.abs(res.log_p - truth))),
                                           float(np.max(np.abs(res.x_0 - x_0))))
        # Control: the time direction reversed -- x_1 carried from t = 0 to
        # t = 1 (forwards) instead of back from t = 1 to t = 0.
        x_end, delta, _ = cnf.log_density_change(field, x_1, 0.0, 1.0, method="DOP853", rtol=ODE_TOL, atol=ODE_TOL)
        wrong = cnf.standard_normal_log_prob(x_end) + delta
        control[name] = float(np.max(np.abs(wrong - truth)))
    return Outcome(
        compared="log p_1(x_1) by eq 14 (DOP853, rtol = atol = 1e-10; exact and autograd divergence) and "
        "the recovered x_0, vs the Gaussian pushforward N(psi_1(0), e^A e^A^T) of N(0, I) and the exact "
        "flow, for u = A x + b0 + t b1 (3-D, non-symmetric A) and u = (c0 + t c1) * x",
        error=max(errors.values()),
        measure='max absolute error (log p, x_0)',
        tolerance=ODE_BOUND,
        why="an ODE error at local tolerance 1e-10 (see ODE_BOUND)",
        control="time direction reversed: x_1 integrated from t = 0 to t = 1 instead of 1 -> 0",
        control_error=min(control.values()),
        details={"max |error|": errors, "control |error|": control},
    )


def _hutchinson_pointwise(rng, n_points, n_probes):
    """z-scores of Hutchinson's mean and variance at single points of a nonlinear field."""
    target = targets.random_mixture(3, 3, rng)
    field = cnf.marginal_field(target.marginal(all_paths()[0]))
    t = 0.6
    x = target.marginal(all_paths()[0]).sample(n_points, t, rng)
    exact = field.divergence(t, x)
    J = autodiff.jacobian_pointwise(lambda z: field(t, z), x)
    # Each point repeated `copies` times: rows get independent probes, so
    # `n_probes_per_row` probes on each copy give copies * n_probes_per_row
    # independent probes per point in a few reverse passes.
    copies = n_probes // 4
    x_rep = np.repeat(x, copies, axis=0)
    z_scores = {}
    for probe in _PROBES:
        _, _, samples = cnf.hutchinson_divergence(field, t, x_rep, rng, n_probes=4, probe=probe)
        samples = samples.reshape(4, n_points, copies)
        for i in range(n_points):
            mean, var, mu4 = quadratic_form_moments(J[i], probe)
            s = samples[:, i, :].ravel()
            z_scores[f"{probe} point {i} mean"] = float((s.mean() - exact[i]) / np.sqrt(var / n_probes))
            z_scores[f"{probe} point {i} variance"] = variance_z(s, var, mu4)
    return z_scores


def _time_linear_field(rng):
    d = 3
    return TimeLinearField(0.7 * rng.standard_normal((d, d)), 1.2 * rng.standard_normal((d, d)))


@register("cnf.hutchinson", "14 (Hutchinson)", quick=True)
def check_hutchinson(rng, quick):
    # (1) At single points of a nonlinear field: the estimator's mean is the
    # exact divergence and its variance is 2||S||_F^2 (minus 2 sum J_ii^2 for
    # Rademacher).
    z_scores = _hutchinson_pointwise(rng, n_points=6, n_probes=4000)
    # (2) Along trajectories, probes fixed: each probe's integral is exactly
    # eps^T M eps with M = int_0^1 J dt, so the per-probe estimates of
    # int div have the moments of that quadratic form.
    field = _time_linear_field(rng)
    n, k = 2000, 10
    x_1 = rng.standard_normal((n, 3))
    exact = np.trace(field.M)
    for probe in _PROBES:
        res = cnf.log_prob(field, x_1, divergence="hutchinson", n_probes=k, probe=probe, rng=rng,
                           method="rk4", n_steps=10)
        integral = cnf.standard_normal_log_prob(res.x_0)[None, :] - res.log_p_probes  # (k, n)
        mean, var, mu4 = quadratic_form_moments(field.M, probe)
        z_scores[f"trajectory {probe} mean"] = float((integral.mean() - exact) / np.sqrt(var / integral.size))
        z_scores[f"trajectory {probe} variance"] = variance_z(integral, var, mu4)
        # The reported standard errors: k * stderr^2 is each point's sample
        # variance over its k probes; their mean over n points has mean var
        # and variance Var(s^2_k) / n.
        s2 = k * res.log_p_stderr**2
        var_s2 = (mu4 - (k - 3) / (k - 1) * var**2) / k
        z_scores[f"trajectory {probe} reported stderr"] = float((s2.mean() - var) / np.sqrt(var_s2 / n))
    # Control: a fresh probe at every evaluation, same driver, same comparison.
    n_ctrl = n * k
    x_ctrl = rng.standard_normal((n_ctrl, 3))
    control = {}
    for probe in _PROBES:
        res = cnf.log_prob(field, x_ctrl, divergence=RedrawnProbe(field, probe, rng), method="rk4", n_steps=10)
        integral = res.divergence_integral
        mean, var, mu4 = quadratic_form_moments(field.M, probe)
        control[f"{probe} mean"] = float((integral.mean() - exact) / np.sqrt(var / n_ctrl))
        control[f"{probe} variance"] = variance_z(integral, var, mu4)
    threshold = bonferroni_z(len(z_scores))
    return Outcome(
        compared="Hutchinson's estimator vs exact moments: at 6 points of a 3-D mixture marginal field "
        "(4000 probes each), z of the mean vs the closed-form divergence and z of the sample variance vs "
        "2||S||_F^2 (Gaussian) / 2||S||_F^2 - 2 sum J_ii^2 (Rademacher); along trajectories of "
        "u = (A0 + t A1) x (rk4, probes fixed), the same for eps^T M eps, "
        "M = A0 + A1/2 (2000 points x 10 probes), and of the mean reported k * stderr^2 against that variance",
        error=max(abs(z) for z in z_scores.values()),
        measure='max |z| (Bonferroni threshold)',
        tolerance=threshold,
        why=f"each z-score is asymptotically standard normal under the theory (exact moments of the "
        f"quadratic form); {len(z_scores)} comparisons, Bonferroni at family-wise level 1e-3",
        control="a probe redrawn at every evaluation (unbiased per evaluation, but the trajectory "
        "integral's variance collapses below Var(eps^T M eps))",
        control_error=min(abs(control[f"{p} variance"]) for p in _PROBES),
        details={"z-scores": z_scores, "control z-scores": control},
    )


@register("cnf.round_trip", "9-14", quick=True)
def check_round_trip(rng, quick):
    target = targets.eight_gaussians()
    field = cnf.marginal_field(target.marginal(all_paths()[1]))  # OT, sigma_min = 0.05: p_0 = N(0, I)
    fwd = cnf.sample_with_log_prob(field, 24, 2, rng, method="DOP853", rtol=ODE_TOL, atol=ODE_TOL)
    bwd = cnf.log_prob(field, fwd.x_1, method="DOP853", rtol=ODE_TOL, atol=ODE_TOL)
    truth = field.marginal.log_prob(fwd.x_1, 1.0)
    errors = {
        "log p forward vs backward": float(np.max(np.abs(fwd.log_p - bwd.log_p))),
        "x_0 recovered": float(np.max(np.abs(fwd.x_0 - bwd.x_0))),
        "log p forward vs closed form": float(np.max(np.abs(fwd.log_p - truth))),
    }
    # Control: the forward pass accumulating +div instead of -div.
    wrong = cnf.sample_with_log_prob(_FlippedDivergence(field.marginal), 24, 2, rng,
                                     method="DOP853", rtol=ODE_TOL, atol=ODE_TOL)
    return Outcome(
        compared="sample_with_log_prob (0 -> 1) then log_prob (1 -> 0), DOP853 rtol = atol = 1e-10, "
        "on the eight-Gaussians marginal field (OT path): log p both ways, x_0 recovered, and log p vs "
        "the closed form",
        error=max(errors.values()),
        measure='max absolute error (log p, x_0)',
        tolerance=ODE_BOUND,
        why="two ODE solves at local tolerance 1e-10 (see ODE_BOUND)",
        control="forward pass with the divergence's sign flipped (judged against the closed form)",
        control_error=float(np.max(np.abs(wrong.log_p - field.marginal.log_prob(wrong.x_1, 1.0)))),
        details={"max |error|": errors, "nfe (forward, backward)": (fwd.nfe, bwd.nfe)},
    )


def small_mlp_field(rng, dim=2, hidden=(32, 32), activation="tanh", scale=2.5):
    """A randomly initialised MLP field (weights scaled so the flow is far from the identity)."""
    from refflow.nn import MLP

    mlp = MLP(dim, hidden, activation)
    return cnf.mlp_field(mlp, scale * mlp.init_params(rng))


@register("cnf.continuous_limit", "5-10, 14", quick=True)
def check_continuous_limit(rng, quick):
    field = small_mlp_field(rng)
    x_0 = rng.standard_normal((16, 2))
    steps = (8, 16, 32, 64) if quick else (8, 16, 32, 64, 128)
    result = cnf.continuous_limit(field, x_0, steps, rtol=ODE_TOL, atol=ODE_TOL)
    # Control: the log-determinants added instead of subtracted (eq 5 with
    # the Jacobian of phi_k instead of phi_k^{-1}), same flows, same reference.
    wrong = [
        float(np.max(np.abs(cnf.standard_normal_log_prob(x_0) + euler.log_det - ref)))
        for euler, ref in zip(result.euler, result.log_p_cnf)
    ]
    wrong_slope = float(np.polyfit(np.log(1.0 / np.array(steps)), np.log(wrong), 1)[0])
    return Outcome(
        compared="log-likelihood of the Euler map as K residual layers x + u(t_k, x)/K with exact "
        "log|det(I + J/K)| (eq 5-6) vs the CNF log-likelihood (eq 14, DOP853 1e-10) at the same points, "
        "random 2-D MLP 2x32 tanh; fitted slope of log error vs log(1/K), K = 8..128 (--quick: 8..64)",
        error=abs(result.slope - 1.0),
        measure='|fitted slope - 1|',
        tolerance=0.3,
        why="Euler is first order: log det(I + dJ) = d tr J + O(d^2) per step and the trajectory error "
        "is O(d), so the error is C/K + O(1/K^2); ±0.3 separates neighbouring orders",
        control="log-determinants with the wrong sign (log p_0 + sum log|det|): the error stays O(1)",
        control_error=abs(wrong_slope - 1.0),
        details={"n_steps": list(steps), "errors": result.errors, "slope": result.slope,
                 "control errors": wrong, "control slope": wrong_slope},
    )
