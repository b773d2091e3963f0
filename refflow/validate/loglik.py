r"""kind = "loglik": a log-likelihood ``x -> log p_1(x)`` against the closed form (eq 14, 16)."""
from __future__ import annotations

import functools
import math

import numpy as np

from refflow._validation import as_rng, check_scalar
from refflow.autodiff import jacobian_pointwise
from refflow.solvers import integrate
from refflow.stats import FAMILY_ALPHA, bonferroni_z
from refflow.validate.calling import Caller, batched, resolve_impl
from refflow.validate.catalog import get_case, require_kind
from refflow.validate.causes import match_variants, max_row_distance, no_sigma_min
from refflow.validate.errors import row_error
from refflow.validate.judge import inputs_property
from refflow.validate.precision import FLOAT64_ROUNDOFF, SAFETY, f32_exact
from refflow.validate.report import CheckReport, PropertyResult

__all__ = ["check_loglik", "LOGLIK_TOL", "loglik_bound", "hutchinson_variance"]

LOGLIK_TOL = 1e-6
"""Default tolerance of a float64 log-likelihood (an ODE solution): error relative to max(1, |log p_1|)."""

LOGLIK_STEPS = 1000
"""Steps of the ODE integration a lower-precision CNF is allowed the rounding of (see :func:`loglik_bound`)."""

N_REPEATS = 16
"""Calls of a stochastic (Hutchinson) log-likelihood used to judge its mean."""

_LOG_2PI = math.log(2.0 * math.pi)


def _pull_back(case, x) -> np.ndarray:
    """x_0 = psi_1^{-1}(x): integrate the exact field from t = 1 back to t = 0 (eq 10)."""
    # the variants only need to be told apart (to 10 % of their distance): rtol 1e-6 is ample
    sol = integrate(case.marginal.field(), x, 1.0, 0.0, method="DOP853", rtol=1e-6, atol=1e-6)
    return sol.x


def _log_normal(x) -> np.ndarray:
    return -0.5 * np.sum(x**2, axis=1) - 0.5 * x.shape[1] * _LOG_2PI


def loglik_bound(case, x, truth, unit_roundoff: float) -> np.ndarray:
    r"""Per-point bound on :math:`|\ell(x) - \log p_1(x)|`, in nats.

    The ODE error a float64 CNF makes, :data:`LOGLIK_TOL` relative to
    :math:`\max(1, |\log p_1|)`, plus, for lower precision, the rounding of
    an integration of :data:`LOGLIK_STEPS` steps, each backward stable:
    :math:`\sqrt{K}\, c u (|\log p_1(x)| + \sum_j |x_j \partial_j \log p_1(x)| + d)`
    (independent roundings add like a random walk; the bracket is the
    conditioning in x and the d terms of :math:`\log p_0`).  For float64 the
    second part is negligible.
    """
    scale = np.maximum(np.abs(truth), 1.0)
    if unit_roundoff <= FLOAT64_ROUNDOFF:
        return LOGLIK_TOL * scale
    score = case.marginal.score(x, 1.0)
    cond = np.abs(truth) + np.sum(np.abs(x * score), axis=1) + x.shape[1]
    return LOGLIK_TOL * scale + math.sqrt(LOGLIK_STEPS) * SAFETY * unit_roundoff * cond


def hutchinson_variance(case, x, n_steps: int = 64) -> dict:
    r"""Variance of a Hutchinson estimate of :math:`\log p_1(x)` with one probe per trajectory.

    With the probe :math:`\varepsilon` fixed along the trajectory, the
    estimate of :math:`\int_0^1 \nabla\cdot u_t\,dt` is :math:`\varepsilon^T M \varepsilon`
    with :math:`M = \int_0^1 \partial u_t/\partial x\,dt` along the exact flow
    through x, whose variance is :math:`2\|S\|_F^2` for a Gaussian probe and
    :math:`2(\|S\|_F^2 - \sum_i S_{ii}^2)` for a Rademacher one
    (:math:`S = (M + M^T)/2`; Hutchinson 1990).  M integrates refflow's exact
    Jacobian of the mixture field (autograd, :func:`refflow.autodiff.jacobian_pointwise`)
    by the trapezoidal rule along an RK4 pull-back of 64 steps.
    """
    field = case.marginal.field()
    n, d = x.shape
    dt = 1.0 / n_steps
    M = np.zeros((n, d, d))
    y = x.copy()

    def jac(tt, yy):
        return jacobian_pointwise(lambda z: case.marginal.velocity(z, tt), yy)

    ts = np.linspace(1.0, 0.0, n_steps + 1)
    weights = np.full(n_steps + 1, dt)
    weights[[0, -1]] = dt / 2.0                            # trapezoidal rule in t
    for k, tk in enumerate(ts):
        M += weights[k] * jac(tk, y)
        if k < n_steps:                                    # RK4 step backward in time
            k1 = field(tk, y)
            k2 = field(tk - dt / 2, y - dt / 2 * k1)
            k3 = field(tk - dt / 2, y - dt / 2 * k2)
            k4 = field(tk - dt, y - dt * k3)
            y = y - dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    S = 0.5 * (M + np.transpose(M, (0, 2, 1)))
    fro = np.sum(S**2, axis=(1, 2))
    diag = np.sum(np.diagonal(S, axis1=1, axis2=2) ** 2, axis=1)
    return {"gaussian": 2.0 * fro, "rademacher": 2.0 * (fro - diag)}


def check_loglik(impl, case, *, threshold=None, n: int = 128, seed=0, batch_size=None) -> CheckReport:
    r"""Check a log-likelihood ``impl(x) -> log p_1(x)`` against the closed form (eq 14, 16).

    Properties
    ----------
    ``log_p1``
        :math:`|\ell_i - \log p_1(x_i)|` per point against :func:`loglik_bound`
        (``threshold`` replaces :data:`LOGLIK_TOL`); reported relative to
        :math:`\max(1, |\log p_1|)`.  For a stochastic estimate (two calls
        differ: a Hutchinson trace with a fresh probe per call) the mean of
        :data:`N_REPEATS` calls is judged instead, by a z-test of unbiasedness
        that allows the same ODE error.
    ``deterministic``
        A second call on the same points returns the same values.  Judged
        only when the estimate is not judged statistically; a probe redrawn
        at every *step* of one solve still fails ``log_p1``.
    ``variance``
        For a stochastic estimate: its variance per point beside the theory
        for one probe per trajectory (:func:`hutchinson_variance`).
    ``inputs``
        The implementation left ``x`` unchanged.

    Points: 3/4 drawn from :math:`p_1`, 1/4 from :math:`\mathcal N(0, I)`
    (between the modes, where the flow bends most).
    """
    fn, impl_name = resolve_impl(impl)
    case = get_case(case)
    require_kind(case, "loglik")
    n = check_scalar(n, "n", low=8, integer=True)
    if threshold is not None:
        threshold = check_scalar(threshold, "threshold", low=0.0)
    rng = as_rng(seed)
    d = case.dim
    n_data = (3 * n) // 4
    x = f32_exact(np.concatenate([case.marginal.sample(n_data, 1.0, rng),
                                  rng.standard_normal((n - n_data, d))]))
    truth = case.marginal.log_prob(x, 1.0)
    caller = Caller(fn, "loglik(x)", ("x",))

    def one(rows):
        m = x[rows].shape[0]
        return caller.output(caller(x[rows]), "the log-likelihood (one value per row of x)", (m,))

    first = batched(one, n, batch_size)
    second = batched(one, n, batch_size)
    scale = np.maximum(np.abs(truth), 1.0)
    bound = loglik_bound(case, x, truth, caller.precision)
    if threshold is not None:
        bound = bound - LOGLIK_TOL * scale + threshold * scale
    bound_rel = bound / scale
    det_err = row_error(second[:, None], first[:, None], scale)
    # any row that differs beyond its bound: a Rademacher probe in d = 2 repeats itself on half the
    # rows (eps and -eps give the same estimate), so "most rows differ" would miss it
    stochastic = bool(np.all(np.isfinite(first)) and np.all(np.isfinite(second)) and np.any(det_err > bound_rel))

    @functools.lru_cache(maxsize=1)
    def x_0():
        return _pull_back(case, x)

    no_min = no_sigma_min(case.path)
    variants = {
        # log p_0(x_0) - int div = truth, so flipping the integral's sign gives 2 log p_0(x_0) - truth
        "divergence_sign": lambda: 2.0 * _log_normal(x_0()) - truth,
        "no_divergence": lambda: _log_normal(x_0()),
        "missing_normaliser": lambda: truth + 0.5 * d * _LOG_2PI,
        "negative_log_likelihood": lambda: -truth,
    }
    if no_min is not None:
        variants["sigma_min_dropped"] = lambda: case.target.marginal(no_min).log_prob(x, 1.0)
    desc = (f"log p_1(x) vs the closed form (eq 16 at t = 1), error relative to max(1, |log p_1|); "
            f"{n} points, {n_data} from p_1 and {n - n_data} from N(0, I)")
    props = []
    if not stochastic:
        err_rows = row_error(first[:, None], truth[:, None], scale)
        finite = np.isfinite(first)
        ratio = np.where(finite, err_rows / bound_rel, np.inf)
        worst = int(np.argmax(ratio))
        passed = bool(np.all(err_rows <= bound_rel))
        causes = []
        if not passed:
            if not np.all(finite):
                causes = ["nonfinite"]
            else:
                causes = match_variants(first[:, None], truth[:, None],
                                        {k: (lambda v=v: v()[:, None]) for k, v in variants.items()},
                                        max_row_distance(scale))
        props.append(PropertyResult(
            "log_p1", desc, float(err_rows[worst]), float(bound_rel[worst]), passed, causes,
            {"max_abs_error_nats": float(np.max(np.abs(first - truth))),
             "nonfinite_rows": int((~finite).sum()),
             "tolerance_rule": (f"{LOGLIK_TOL if threshold is None else threshold!r} (the ODE's error) "
                                f"+ the rounding bound of the output dtype, per point")}))
        det_passed = bool(np.all(det_err <= bound_rel))
        props.append(PropertyResult(
            "deterministic", "a second call on the same points gives the same values",
            float(np.max(det_err)), float(np.min(bound_rel)), det_passed,
            [] if det_passed else ["stochastic_divergence"]))
    else:
        props += _statistical(caller, one, n, batch_size, first, second, truth, bound, scale, desc, variants, case, x)
    props.append(inputs_property(caller))
    return CheckReport("loglik", case.name, impl_name, props,
                       {"n": n, "seed": seed, "output_dtype": caller.dtype_name, "threshold": threshold})


def _statistical(caller, one, n, batch_size, first, second, truth, bound, scale, desc, variants, case, x):
    """log_p1 judged by the mean of repeated calls (a z-test), the variance reported beside theory."""
    calls = [first, second] + [batched(one, n, batch_size) for _ in range(N_REPEATS - 2)]
    L = np.stack(calls)                                   # (R, n)
    R = L.shape[0]
    diff = L.mean(axis=0) - truth
    var = L.var(axis=0, ddof=1)
    se = math.sqrt(float(np.sum(var)) / R) / n
    bias = float(diff.mean())
    allowance = float(bound.mean())                       # the ODE error a correct estimator may carry
    z = (abs(bias) - allowance) / se if se > 0 else (np.inf if abs(bias) > allowance else 0.0)
    z = max(float(z), 0.0)
    tol = bonferroni_z(1, FAMILY_ALPHA)
    passed = bool(np.isfinite(bias) and z <= tol)
    causes = []
    if not passed:
        mean_rows = L.mean(axis=0)
        causes = match_variants(mean_rows[:, None], truth[:, None],
                                {k: (lambda v=v: v()[:, None]) for k, v in variants.items()},
                                max_row_distance(scale))
        causes = causes or ["biased_trace_estimate"]
    theory = hutchinson_variance(case, x[:16])
    observed = var[:16]
    p_mean = PropertyResult(
        "log_p1", desc + f"; stochastic: the mean of {R} calls, z-test of unbiasedness beyond the ODE "
                         f"allowance {allowance:.2g} nats",
        z, tol, passed, causes,
        {"mean_error_nats": bias, "stderr": se, "allowance_nats": allowance})
    ratio_g = float(np.median(observed / np.maximum(theory["gaussian"], 1e-300)))
    ratio_r = float(np.median(observed / np.maximum(theory["rademacher"], 1e-300)))
    p_var = PropertyResult(
        "variance", "variance per point of the stochastic estimate vs one probe per trajectory "
                    "(2 ||S||_F^2 Gaussian, 2 (||S||_F^2 - sum S_ii^2) Rademacher); reported only",
        float(np.median(observed)), None, None,
        details={"observed": observed.tolist(), "theory_gaussian": theory["gaussian"].tolist(),
                 "theory_rademacher": theory["rademacher"].tolist(),
                 "median_ratio_gaussian": ratio_g, "median_ratio_rademacher": ratio_r},
        note=f"observed / theory: {ratio_g:.2g} (Gaussian probe), {ratio_r:.2g} (Rademacher)")
    p_det = PropertyResult("deterministic", "two calls on the same points differ: judged statistically",
                           float(np.max(np.abs(second - first) / scale)), None, None,
                           note="stochastic estimate: judged by its mean over repeated calls")
    return [p_mean, p_det, p_var]
