"""Value checks of the CNF machinery on linear fields, where every quantity has a closed form.

For :math:`u_t(x) = A(t)\\,x`:

* the Euler flow (eq 5-6) is :math:`x_{k+1} = (I + \\delta A(t_k)) x_k` and its
  log-determinant is :math:`\\sum_k \\log|\\det(I + \\delta A(t_k))|` exactly;
* with constant :math:`A` the divergence is :math:`\\operatorname{tr} A`
  everywhere, so the divergence integral that :func:`refflow.cnf.log_prob` and
  :func:`refflow.cnf.sample_with_log_prob` return is :math:`\\operatorname{tr} A`
  to rounding (any quadrature integrates a constant exactly) and
  :math:`\\log p_1(x_1) = \\log p_0(x_0) - \\operatorname{tr} A` (eq 14);
* Hutchinson's probe products are :math:`\\varepsilon^\\top A \\varepsilon`, with
  mean :math:`\\operatorname{tr} A`; the central-difference branch (for fields
  autograd cannot trace) is exact on a linear field up to rounding, so it
  must reproduce the autograd branch probe by probe.
"""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from scipy import stats as sps

from refflow import cnf
from refflow.stats import EXACT_TOL, bonferroni_z, rel_err
from refflow.verify.registry import Outcome, register

_A0 = np.array([[-0.4, 1.3, 0.2], [-0.7, 0.3, -0.5], [0.1, 0.6, -0.2]])
_A1 = np.array([[0.5, -0.2, 0.0], [0.9, -0.6, 0.3], [-0.4, 0.0, 0.8]])

FD_TOL = 1e-8
"""Central differences of a linear field: exact but for rounding, ~eps / h = eps^(2/3) ~ 4e-11 relative."""


def _A(t):
    return _A0 + t * _A1


def _euler_exact(x_0, K, shift=0):
    delta = 1.0 / K
    x, log_det = x_0.copy(), np.zeros(x_0.shape[0])
    for k in range(K):
        M = np.eye(3) + delta * _A((k + shift) * delta)
        log_det += np.log(abs(np.linalg.det(M)))
        x = x @ M.T
    return x, log_det


@register("cnf.euler_flow_exact", equations="2, 5, 6", quick=True)
def check_euler_flow_exact(rng, quick):
    x_0 = rng.standard_normal((20, 3))
    K = 16
    res = cnf.euler_flow_log_prob(lambda t, x: anp.dot(x, _A(t).T), x_0, K)
    x_ref, ld_ref = _euler_exact(x_0, K)
    log_p_ref = sps.multivariate_normal(np.zeros(3), np.eye(3)).logpdf(x_0) - ld_ref
    error = max(rel_err(res.x_1, x_ref), rel_err(res.log_det, ld_ref), rel_err(res.log_p, log_p_ref))
    x_bad, ld_bad = _euler_exact(x_0, K, shift=1)
    control = max(rel_err(x_bad, x_ref), rel_err(ld_bad, ld_ref))
    return Outcome(
        compared="euler_flow_log_prob on u = (A_0 + t A_1) x, K = 16: x_1, the log-determinant and log p_1 vs "
                 "the products (I + delta A(t_k)) and sum log|det| computed directly",
        error=error, tolerance=EXACT_TOL, why="the same discrete flow in float64: only rounding separates them",
        control="the Euler flow with every layer at t_{k+1}", control_error=control,
    )


def _constant_field(t, x):
    return anp.dot(x, _A0.T)


class _Untraceable:
    """The same linear field through np.asarray, which autograd cannot trace."""

    def __call__(self, t, x):
        return np.asarray(x) @ _A0.T


@register("cnf.divergence_integral", equations="9, 13, 14", quick=True)
def check_divergence_integral(rng, quick):
    tr = float(np.trace(_A0))
    n = 30
    errors = {}
    base = sps.multivariate_normal(np.zeros(3), np.eye(3))
    for div in ("autograd", lambda t, x: np.full(x.shape[0], tr)):
        name = div if isinstance(div, str) else "callable"
        fwd = cnf.sample_with_log_prob(_constant_field, n, 3, rng, divergence=div, method="rk4", n_steps=20)
        errors[f"sample_with_log_prob {name}: divergence_integral"] = rel_err(fwd.divergence_integral, np.full(n, tr))
        errors[f"sample_with_log_prob {name}: log_p"] = rel_err(fwd.log_p, base.logpdf(fwd.x_0) - tr)
        back = cnf.log_prob(_constant_field, fwd.x_1, divergence=div, method="rk4", n_steps=20)
        errors[f"log_prob {name}: divergence_integral"] = rel_err(back.divergence_integral, np.full(n, tr))
        errors[f"log_prob {name}: log_p"] = rel_err(back.log_p, base.logpdf(back.x_0) - tr)
    return Outcome(
        compared="divergence_integral and log_p of sample_with_log_prob and log_prob on u = A x (RK4, autograd "
                 "and callable divergences) vs tr A and log N(x_0; 0, I) - tr A",
        error=max(errors.values()), tolerance=EXACT_TOL,
        why="a constant integrand is integrated exactly by any quadrature: only rounding remains",
        control="the divergence integral with its sign flipped", control_error=rel_err(-tr, tr),
        details=errors,
    )


def _probe_variance(probe):
    S = 0.5 * (_A0 + _A0.T)
    var = 2.0 * np.sum(S**2)
    return var - 2.0 * np.sum(np.diag(S) ** 2) if probe == "rademacher" else var


@register("cnf.hutchinson_branches", equations="14 (Hutchinson)", quick=True)
def check_hutchinson_branches(rng, quick):
    tr = float(np.trace(_A0))
    n, k = 500, 16
    x = rng.standard_normal((n, 3))
    zs, exact, wrong = [], {}, []
    for probe in ("rademacher", "gaussian"):
        seed = int(rng.integers(2**31))
        est, se, samples = cnf.hutchinson_divergence(_constant_field, 0.3, x, seed, n_probes=k, probe=probe)
        est_fd, se_fd, samples_fd = cnf.hutchinson_divergence(_Untraceable(), 0.3, x, seed, n_probes=k, probe=probe)
        # the difference branch must give the same probe products as the autograd branch (same probes)
        exact[f"{probe}: fd vs autograd"] = rel_err(samples_fd, samples) / FD_TOL * EXACT_TOL
        exact[f"{probe}: stderr"] = rel_err(se, samples.std(axis=0, ddof=1) / np.sqrt(k))
        exact[f"{probe}: estimate"] = rel_err(est, samples.mean(axis=0))
        # the probes' mean over n k independent products vs tr A
        zs.append((samples.mean() - tr) / np.sqrt(_probe_variance(probe) / (n * k)))
        # Planted bug: the central difference divided by h, not 2h (twice the products)
        wrong.append(abs(2.0 * samples_fd.mean() - tr) / np.sqrt(_probe_variance(probe) / (n * k)))
    # log_prob with Hutchinson through the difference branch: its standard error and its mean
    m = 40
    res = cnf.log_prob(_Untraceable(), x[:m], divergence="hutchinson", n_probes=k, rng=rng, method="rk4",
                       n_steps=4)
    exact["log_prob stderr"] = rel_err(res.log_p_stderr, res.log_p_probes.std(axis=0, ddof=1) / np.sqrt(k))
    base = sps.multivariate_normal(np.zeros(3), np.eye(3)).logpdf(res.x_0)
    z_points = np.abs(res.log_p - (base - tr)) / np.sqrt(_probe_variance("rademacher") / k)
    # one scale for the pass rule: each part over its own threshold
    ratios = {"probe means (z / threshold)": float(np.max(np.abs(zs))) / bonferroni_z(len(zs)),
              "log_prob per point (z / threshold)": float(z_points.max()) / bonferroni_z(m),
              "exact identities (error / 1e-10)": max(exact.values()) / EXACT_TOL}
    error = max(ratios.values())
    return Outcome(
        compared="hutchinson_divergence on u = A x (Rademacher and Gaussian probes, autograd and central-difference "
                 "branches) and cnf.log_prob with Hutchinson through the difference branch: probe means vs tr A, "
                 "the two branches probe by probe, the standard errors vs their formula",
        error=error, tolerance=1.0,
        why="a ratio to each part's threshold: z-scores (exact probe variance 2|S|_F^2 (- 2 sum S_ii^2 for "
            "Rademacher)) over the Bonferroni z; exact identities over 1e-10 (the difference branch over 1e-8, "
            "rounding of a central difference)",
        control="central differences divided by h instead of 2h", control_error=max(wrong) / bonferroni_z(len(zs)),
        details={"ratios": ratios, "exact": exact},
    )
