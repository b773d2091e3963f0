"""A zoo of flow-matching implementations with planted, realistic mistakes.

Each function is written the way a user would write it, in plain NumPy, with
the calling convention of ``refflow check`` (see :mod:`refflow.validate`):

* path:    ``(x_0, x_1, t) -> (x_t, u_t)``
* field:   ``(t, x) -> u`` or ``(t, x, y) -> u``
* loglik:  ``x -> log p_1(x)``
* sampler: ``(n, seed) -> samples``
* guided:  ``(t, x, y, w) -> u``

The functions without a ``bug_`` prefix are correct and must pass; each
``bug_`` function carries one mistake and must be flagged.  The paths and
fields are independent NumPy code (not refflow's); the log-likelihoods and
guided fields stand on refflow's closed-form field, as a user's CNF or
guidance code stands on a trained network, and the mistake is in the code
around it.  ``ZOO`` (at the bottom) lists every entry with its case and the
property and likely cause ``refflow check`` is expected to report.
"""
from __future__ import annotations

import numpy as np
import scipy.integrate

from refflow.validate import get_case

OT = "eight-gaussians/ot/sigma_min=0/d=2"
OT_MIN = "eight-gaussians/ot/sigma_min=0.05/d=2"
VP = "eight-gaussians/vp/sigma_min=0/d=2"
LINEAR_VP = "eight-gaussians/linear-vp/sigma_min=0/d=2"
SIGMA_MIN = 0.05

# The eight-Gaussians target written out by hand: means on a circle of radius 4, std 0.4.
RADIUS, STD = 4.0, 0.4
MEANS = RADIUS * np.stack([np.cos(2 * np.pi * np.arange(8) / 8), np.sin(2 * np.pi * np.arange(8) / 8)], axis=1)


# ---------------------------------------------------------------------------
# Paths (x_0, x_1, t) -> (x_t, u_t)
# ---------------------------------------------------------------------------


def ot_path(x_0, x_1, t):
    """Correct OT path with sigma_min = 0.05 (eq 34-35)."""
    t = t[:, None]
    x_t = (1 - (1 - SIGMA_MIN) * t) * x_0 + t * x_1
    return x_t, x_1 - (1 - SIGMA_MIN) * x_0


def ot_path_float32(x_0, x_1, t):
    """Correct OT path (sigma_min = 0) computed in float32, in the form that stays accurate at t = 1."""
    x_0, x_1, t = (np.asarray(a, dtype=np.float32) for a in (x_0, x_1, t))
    t = t[:, None]
    return (1 - t) * x_0 + t * x_1, x_1 - x_0


def _vp_schedule(t, beta_min=0.1, beta_max=20.0):
    s = 1.0 - t
    T = beta_min * s + 0.5 * (beta_max - beta_min) * s**2
    dT = beta_min + (beta_max - beta_min) * s
    alpha = np.exp(-0.5 * T)
    sigma = np.sqrt(-np.expm1(-T))
    d_alpha = 0.5 * alpha * dT
    d_sigma = -alpha * d_alpha / sigma
    return alpha, sigma, d_alpha, d_sigma


def vp_path(x_0, x_1, t):
    """Correct VP path (eq 33): alpha_t = a(1 - t)."""
    alpha, sigma, d_alpha, d_sigma = (v[:, None] for v in _vp_schedule(t))
    return sigma * x_0 + alpha * x_1, d_sigma * x_0 + d_alpha * x_1


def bug_path_time_reversed(x_0, x_1, t):
    """Data at t = 0, noise at t = 1 (the diffusers / rectified-flow habit)."""
    t = t[:, None]
    return t * x_0 + (1 - t) * x_1, x_0 - x_1


def bug_path_sigma_squared(x_0, x_1, t):
    """The variance sigma_t^2 used as the standard deviation (consistently, in x_t and u_t)."""
    t = t[:, None]
    var = (1 - (1 - SIGMA_MIN) * t) ** 2
    d_var = -2 * (1 - SIGMA_MIN) * (1 - (1 - SIGMA_MIN) * t)
    return var * x_0 + t * x_1, d_var * x_0 + x_1


def bug_path_sigma_min_dropped(x_0, x_1, t):
    """sigma_min in the interpolation but the target of eq 37 (x_1 - x_0) instead of eq 36."""
    t = t[:, None]
    return (1 - (1 - SIGMA_MIN) * t) * x_0 + t * x_1, x_1 - x_0


def bug_path_swapped(x_0, x_1, t):
    """x_0 and x_1 exchanged in the interpolation and the target."""
    t = t[:, None]
    return (1 - (1 - SIGMA_MIN) * t) * x_1 + t * x_0, x_0 - (1 - SIGMA_MIN) * x_1


def bug_path_ot_target_sign(x_0, x_1, t):
    """OT target with a sign error: (1 - sigma_min) x_0 - x_1."""
    t = t[:, None]
    return (1 - (1 - SIGMA_MIN) * t) * x_0 + t * x_1, (1 - SIGMA_MIN) * x_0 - x_1


def bug_path_vp_alpha_forward(x_0, x_1, t):
    """VP schedule with alpha_t = a(t) instead of a(1 - t): alpha_0 = 1, not ~0."""
    with np.errstate(divide="ignore"):     # sigma = 0 at t = 0 here: d_sigma is -inf
        alpha, sigma, d_alpha, d_sigma = (v[:, None] for v in _vp_schedule(1.0 - t))
    return sigma * x_0 + alpha * x_1, -(d_sigma * x_0 + d_alpha * x_1)


def bug_path_float32_cancellation(x_0, x_1, t):
    """u_t from eq 31, sigma'/sigma (x_t - alpha x_1) + alpha' x_1, in float32; t clipped below 1."""
    x_0, x_1 = (np.asarray(a, dtype=np.float32) for a in (x_0, x_1))
    t = np.minimum(np.asarray(t, dtype=np.float32), np.float32(1 - 1e-7))[:, None]
    sigma = 1 - t
    x_t = sigma * x_0 + t * x_1
    u_t = (-1 / sigma) * (x_t - t * x_1) + x_1
    return x_t, u_t


def vp_path_naive_sigma(x_0, x_1, t):
    """Correct VP path written as flow_matching writes it: sigma = sqrt(1 - exp(-T)), in float64.

    1 - exp(-T) loses digits as T -> 0 (t -> 1), where the path itself is
    ill-conditioned; a correct formula, so it must pass.
    """
    s = 1.0 - t
    T = 0.1 * s + 0.5 * (20.0 - 0.1) * s**2
    dT = 0.1 + (20.0 - 0.1) * s
    alpha = np.exp(-0.5 * T)
    sigma = np.sqrt(1.0 - np.exp(-T))
    d_alpha = 0.5 * alpha * dT
    d_sigma = -0.5 * np.exp(-T) * dT / sigma
    a, s_, da, ds = (v[:, None] for v in (alpha, sigma, d_alpha, d_sigma))
    return s_ * x_0 + a * x_1, ds * x_0 + da * x_1


def linear_vp_path_float32(x_0, x_1, t):
    """Correct linear-VP path (alpha = t, sigma = sqrt(1 - t^2)) in float32, the plain formula."""
    x_0, x_1, t = (np.asarray(a, dtype=np.float32) for a in (x_0, x_1, t))
    t = t[:, None]
    sigma = np.sqrt(1 - t * t)
    with np.errstate(divide="ignore"):
        d_sigma = -t / sigma
    return sigma * x_0 + t * x_1, d_sigma * x_0 + x_1


def ot_path_float16(x_0, x_1, t):
    """Correct OT path (sigma_min = 0) computed in float16."""
    x_0, x_1, t = (np.asarray(a, dtype=np.float16) for a in (x_0, x_1, t))
    t = t[:, None]
    return (1 - t) * x_0 + t * x_1, x_1 - x_0


def bug_path_float16_five_percent(x_0, x_1, t):
    """float16 output 5% too large (a blanket 100 eps tolerance of float16 would pass it)."""
    x_t, u_t = ot_path_float16(x_0, x_1, t)
    return x_t * np.float16(1.05), u_t * np.float16(1.05)


def ot_path_own_noise(x_0, x_1, t):
    """Correct OT path (sigma_min = 0.05) that ignores x_0 and draws its own noise on every call."""
    noise = np.random.default_rng().standard_normal(x_1.shape)
    t = t[:, None]
    return (1 - (1 - SIGMA_MIN) * t) * noise + t * x_1, x_1 - (1 - SIGMA_MIN) * noise


def bug_path_own_noise_sigma_squared(x_0, x_1, t):
    """Own noise, and sigma_t^2 where sigma_t belongs."""
    noise = np.random.default_rng(1).standard_normal(x_1.shape)
    t = t[:, None]
    sigma = 1 - (1 - SIGMA_MIN) * t
    return sigma**2 * noise + t * x_1, -2 * (1 - SIGMA_MIN) * sigma * noise + x_1


def bug_path_noise_redrawn(x_0, x_1, t):
    """Own noise, but a second draw for u_t: the target does not belong to the returned x_t."""
    rng = np.random.default_rng()
    t = t[:, None]
    x_t = (1 - (1 - SIGMA_MIN) * t) * rng.standard_normal(x_1.shape) + t * x_1
    return x_t, x_1 - (1 - SIGMA_MIN) * rng.standard_normal(x_1.shape)


def bug_path_modifies_inputs(x_0, x_1, t):
    """Scales x_0 in place (as x *= 2 on torch.from_numpy(x) does) and returns the path of 2 x_0."""
    x_0 *= 2.0
    t = t[:, None]
    return (1 - (1 - SIGMA_MIN) * t) * x_0 + t * x_1, x_1 - (1 - SIGMA_MIN) * x_0


def bug_path_outputs_swapped(x_0, x_1, t):
    """Returns (u_t, x_t) instead of (x_t, u_t)."""
    x_t, u_t = ot_path(x_0, x_1, t)
    return u_t, x_t


def bug_path_repairs_batch(x_0, x_1, t):
    """Re-pairs the batch: x_0 rows sorted by their first coordinate (a coupling, not a path)."""
    return ot_path(x_0[np.argsort(x_0[:, 0])], x_1, t)


def bug_path_nondeterministic(x_0, x_1, t):
    """Uses x_0 but adds a little unseeded jitter to the target on every call."""
    x_t, u_t = ot_path(x_0, x_1, t)
    return x_t, u_t + 1e-6 * np.random.default_rng().standard_normal(u_t.shape)


def bug_path_nonfinite_and_sigma_min_dropped(x_0, x_1, t):
    """NaN on the rows with t > 0.999, and the target of eq 37 elsewhere: both must be named."""
    x_t, u_t = bug_path_sigma_min_dropped(x_0, x_1, t)
    u_t = u_t.copy()
    u_t[t > 0.999] = np.nan
    return x_t, u_t


# ---------------------------------------------------------------------------
# Fields (t, x[, y]) -> u: the eight-Gaussians marginal field, by hand (eq 19)
# ---------------------------------------------------------------------------


def _mixture_field(t, x, sigma_min=0.0, means=MEANS, nearest=False):
    t = np.asarray(t, dtype=np.float64)[:, None]
    alpha, d_alpha = t, 1.0
    sigma, d_sigma = 1 - (1 - sigma_min) * t, -(1 - sigma_min)
    var = alpha**2 * STD**2 + sigma**2                           # (n, 1): isotropic components
    z = x[:, None, :] - alpha[:, :, None] * means[None]         # (n, K, d)
    logits = -0.5 * np.sum(z**2, axis=2) / var                  # equal weights and variances
    if nearest:
        r = np.zeros_like(logits)
        r[np.arange(len(x)), np.argmax(logits, axis=1)] = 1.0
    else:
        r = np.exp(logits - logits.max(axis=1, keepdims=True))
        r /= r.sum(axis=1, keepdims=True)
    gain = (sigma * d_sigma + alpha * d_alpha * STD**2) / var   # (n, 1)
    u_k = d_alpha * means[None] + gain[:, :, None] * z
    return np.einsum("nk,nkd->nd", r, u_k)


def ot_field(t, x):
    """Correct marginal field of eight Gaussians under OT, sigma_min = 0.05."""
    return _mixture_field(t, x, SIGMA_MIN)


def ot_field_conditional(t, x, y):
    """Correct class-conditional field (label k = component k; -1 = all components)."""
    u = np.empty_like(x)
    for label in np.unique(y):
        rows = y == label
        means = MEANS if label == -1 else MEANS[label:label + 1]
        u[rows] = _mixture_field(t[rows], x[rows], SIGMA_MIN, means)
    return u


def trained_ot_field(t, x):
    """A 'trained model': the field with a small smooth error (passes a threshold, not the exact check)."""
    return _mixture_field(t, x, SIGMA_MIN) * 1.01 + 0.01 * np.sin(x)


def bug_field_arguments_swapped(x, t):
    """A correct field written for the (x, t) order."""
    return _mixture_field(t, x, sigma_min=SIGMA_MIN)


def bug_field_nearest_component(t, x):
    """Responsibilities dropped: the field of the nearest component only."""
    return _mixture_field(t, x, SIGMA_MIN, nearest=True)


def bug_field_time_reversed(t, x):
    """A field trained with data at t = 0, handed over without converting the time."""
    return -_mixture_field(1.0 - np.asarray(t), x, SIGMA_MIN)


def bug_field_sigma_min_dropped(t, x):
    """The field of the sigma_min = 0 path where sigma_min = 0.05 was asked for."""
    return _mixture_field(t, x, 0.0)


# ---------------------------------------------------------------------------
# Log-likelihoods x -> log p_1(x): a CNF (eq 14) around the hand-written field
# ---------------------------------------------------------------------------


def _field_and_divergence(t, x, sigma_min=0.0):
    """The eight-Gaussians OT field and its exact divergence.

    With equal isotropic components u = alpha' mbar + g (x - alpha mbar), mbar = sum_k r_k m_k,
    g = (sigma sigma' + alpha alpha' c) / s2, and grad r_k = r_k alpha (m_k - mbar) / s2, so
    div u = d g + (alpha' - g alpha) (alpha / s2) sum_k r_k |m_k - mbar|^2.
    """
    n, d = x.shape
    alpha, d_alpha = t, 1.0
    sigma, d_sigma = 1 - (1 - sigma_min) * t, -(1 - sigma_min)
    s2 = alpha**2 * STD**2 + sigma**2
    z = x[:, None, :] - alpha * MEANS[None]
    logits = -0.5 * np.sum(z**2, axis=2) / s2
    r = np.exp(logits - logits.max(axis=1, keepdims=True))
    r /= r.sum(axis=1, keepdims=True)
    m_bar = r @ MEANS
    g = (sigma * d_sigma + alpha * d_alpha * STD**2) / s2
    u = d_alpha * m_bar + g * (x - alpha * m_bar)
    spread = np.sum(r * np.sum((MEANS[None] - m_bar[:, None, :]) ** 2, axis=2), axis=1)
    return u, d * g + (d_alpha - g * alpha) * (alpha / s2) * spread


def _cnf(x, divergence_sign=-1.0, normalised=True):
    # d/dt [x_t, L_t] = [u_t(x_t), div u_t(x_t)], integrated from t = 1 (L = 0) back to t = 0,
    # so L_0 = -int_0^1 div u_t dt and log p_1(x) = log p_0(x_0) - int_0^1 div u_t dt (eq 14).
    n, d = x.shape

    def rhs(t, state):
        u, div = _field_and_divergence(t, state.reshape(n, d + 1)[:, :d])
        return np.concatenate([u, div[:, None]], axis=1).ravel()

    state = np.concatenate([x, np.zeros((n, 1))], axis=1).ravel()
    sol = scipy.integrate.solve_ivp(rhs, (1.0, 0.0), state, method="DOP853", rtol=1e-10, atol=1e-10)
    end = sol.y[:, -1].reshape(n, d + 1)
    x_0, integral = end[:, :d], -end[:, d]          # integral = int_0^1 div u_t(x_t) dt
    log_p0 = -0.5 * np.sum(x_0**2, axis=1)
    if normalised:
        log_p0 = log_p0 - 0.5 * d * np.log(2 * np.pi)
    return log_p0 + divergence_sign * integral


def cnf_loglik(x):
    """Correct CNF log-likelihood, adaptive DOP853 at rtol = 1e-10."""
    return _cnf(x)


def bug_loglik_divergence_sign(x):
    """log p_0(x_0) + int div u instead of minus (eq 14)."""
    return _cnf(x, divergence_sign=+1.0)


def bug_loglik_missing_normaliser(x):
    """log p_0(x_0) = -|x_0|^2 / 2, without -d/2 log(2 pi)."""
    return _cnf(x, normalised=False)


def _hutchinson_rk4(x, probe, n_steps=50):
    """RK4 CNF whose divergence is a Hutchinson estimate eps^T (du/dx) eps, ``probe(shape)`` giving eps."""
    n, d = x.shape
    h = 1e-5

    def rhs(t, state):
        x_t = state[:, :d]
        eps = probe(x_t.shape)
        jvp = (_field_and_divergence(t, x_t + h * eps)[0] - _field_and_divergence(t, x_t - h * eps)[0]) / (2 * h)
        return np.concatenate([_field_and_divergence(t, x_t)[0], np.sum(eps * jvp, axis=1)[:, None]], axis=1)

    state, dt = np.concatenate([x, np.zeros((n, 1))], axis=1), -1.0 / n_steps
    for k in range(n_steps):
        t = 1.0 + k * dt
        k1 = rhs(t, state)
        k2 = rhs(t + dt / 2, state + dt / 2 * k1)
        k3 = rhs(t + dt / 2, state + dt / 2 * k2)
        k4 = rhs(t + dt, state + dt * k3)
        state = state + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return -0.5 * np.sum(state[:, :d] ** 2, axis=1) - 0.5 * d * np.log(2 * np.pi) + state[:, d]


def hutchinson_loglik_per_step(x):
    """Hutchinson with a fresh, unseeded Rademacher probe at every evaluation.

    Unbiased (each step's estimate is), so it is judged by its mean over repeated calls and passes.
    """
    rng = np.random.default_rng()
    return _hutchinson_rk4(x, lambda shape: rng.choice([-1.0, 1.0], size=shape))


def hutchinson_loglik_per_trajectory(x):
    """Hutchinson with one Rademacher probe per trajectory, fresh on every call."""
    eps = np.random.default_rng().choice([-1.0, 1.0], size=x.shape)
    return _hutchinson_rk4(x, lambda shape: eps)


def bug_loglik_hutchinson_uniform_probe(x):
    """Hutchinson with a uniform(-1, 1) probe: E[eps eps^T] = I / 3, so the trace is a third too small."""
    rng = np.random.default_rng()
    return _hutchinson_rk4(x, lambda shape: rng.uniform(-1.0, 1.0, size=shape))


# ---------------------------------------------------------------------------
# Samplers (n, seed) -> samples of p_1 (eight Gaussians, OT, sigma_min = 0)
# ---------------------------------------------------------------------------


def _integrate(x, n_steps, method="rk4", t_start=0.0, t_end=1.0):
    dt = (t_end - t_start) / n_steps

    def u(t, x):
        return _mixture_field(np.full(len(x), t), x)

    for k in range(n_steps):
        t = t_start + k * dt
        if method == "euler":
            x = x + dt * u(t, x)
        elif method == "euler_t_plus_delta":
            x = x + dt * u(t + dt, x)          # the mistake: the field at the end of the step
        else:
            k1 = u(t, x)
            k2 = u(t + dt / 2, x + dt / 2 * k1)
            k3 = u(t + dt / 2, x + dt / 2 * k2)
            k4 = u(t + dt, x + dt * k3)
            x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def exact_sampler(n, seed):
    """Correct: draw the mixture directly."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 8, size=n)
    return MEANS[k] + STD * rng.standard_normal((n, 2))


def rk4_sampler(n, seed):
    """Correct: x_0 ~ N(0, I), RK4 with 25 steps along the marginal field (Algorithm 2 with RK4)."""
    return _integrate(np.random.default_rng(seed).standard_normal((n, 2)), 25)


def euler_sampler(n, seed):
    """Correct: Algorithm 2 (Euler, 20 steps, field at the start of each step)."""
    return _integrate(np.random.default_rng(seed).standard_normal((n, 2)), 20, "euler")


def bug_sampler_euler_t_plus_delta(n, seed):
    """Algorithm 2 with the field evaluated at t + delta (20 steps)."""
    return _integrate(np.random.default_rng(seed).standard_normal((n, 2)), 20, "euler_t_plus_delta")


def bug_sampler_wrong_variance(n, seed):
    """Source noise with standard deviation 2 instead of 1."""
    return _integrate(2.0 * np.random.default_rng(seed).standard_normal((n, 2)), 25)


def bug_sampler_time_reversed(n, seed):
    """Starts from noise at t = 1 and integrates to t = 0 (data-at-0 habit)."""
    return _integrate(np.random.default_rng(seed).standard_normal((n, 2)), 25, t_start=1.0, t_end=0.0)


def bug_sampler_unseeded(n, seed):
    """Ignores the seed: the global NumPy random state."""
    return exact_sampler(n, np.random.randint(0, 2**31))


# ---------------------------------------------------------------------------
# Guided fields (t, x, y, w) -> u (eq 40), on refflow's class-conditional fields
# ---------------------------------------------------------------------------


def _fields(t, x, y, null_label=-1):
    case = get_case(OT_MIN)
    u_null = case.conditional_marginal(null_label).velocity(x, t)
    u_cond = np.empty_like(x)
    for label in np.unique(y):
        rows = y == label
        u_cond[rows] = case.conditional_marginal(int(label)).velocity(x[rows], t[rows])
    return u_null, u_cond


def guided_notes(t, x, y, w):
    """Correct, eq 40: (1 - w) u_null + w u_y."""
    u_null, u_cond = _fields(t, x, y)
    return (1 - w) * u_null + w * u_cond


def guided_flow_matching(t, x, y, w):
    """Correct, the flow_matching weighting: (1 + w) u_y - w u_null."""
    u_null, u_cond = _fields(t, x, y)
    return (1 + w) * u_cond - w * u_null


def bug_guided_off_by_one(t, x, y, w):
    """Documented as eq 40 (notes), implemented as (1 + w) u_y - w u_null."""
    return guided_flow_matching(t, x, y, w)


def bug_guided_swapped(t, x, y, w):
    """Conditional and unconditional exchanged: (1 - w) u_y + w u_null."""
    u_null, u_cond = _fields(t, x, y)
    return (1 - w) * u_cond + w * u_null


def bug_guided_null_as_class0(t, x, y, w):
    """The null prompt embedded as class 0 (label -1 wrapped to 0)."""
    u_null, u_cond = _fields(t, x, y, null_label=0)
    return (1 - w) * u_null + w * u_cond


# ---------------------------------------------------------------------------
# The table: name -> (kind, case, options, failing property, likely cause)
# ---------------------------------------------------------------------------

REFERENCES = {
    "ot_path": ("path", OT_MIN, {}),
    "ot_path_float32": ("path", OT, {}),
    "vp_path": ("path", VP, {}),
    "vp_path_naive_sigma": ("path", VP, {}),
    "linear_vp_path_float32": ("path", LINEAR_VP, {}),
    "ot_path_float16": ("path", OT, {}),
    "ot_path_own_noise": ("path", OT_MIN, {}),
    "hutchinson_loglik_per_step": ("loglik", OT, {"n": 32}),
    "hutchinson_loglik_per_trajectory": ("loglik", OT, {"n": 32}),
    "ot_field": ("field", OT_MIN, {}),
    "ot_field_conditional": ("field", OT_MIN, {}),
    "trained_ot_field": ("field", OT_MIN, {"threshold": 1e-3}),
    "cnf_loglik": ("loglik", OT, {}),
    "exact_sampler": ("sampler", OT, {}),
    "rk4_sampler": ("sampler", OT, {}),
    "euler_sampler": ("sampler", OT, {}),
    "guided_notes": ("guided", OT_MIN, {"convention": "notes"}),
    "guided_flow_matching": ("guided", OT_MIN, {}),
}
"""Correct implementations: they must pass."""

ZOO = {
    "bug_path_time_reversed": ("path", OT, {}, "x_t", "time_reversed"),
    "bug_path_sigma_squared": ("path", OT_MIN, {}, "x_t", "sigma_squared"),
    "bug_path_sigma_min_dropped": ("path", OT_MIN, {}, "u_t", "sigma_min_dropped"),
    "bug_path_swapped": ("path", OT_MIN, {}, "x_t", "x0_x1_swapped"),
    "bug_path_ot_target_sign": ("path", OT_MIN, {}, "u_t", "sign_flipped"),
    "bug_path_vp_alpha_forward": ("path", VP, {}, "x_t", "time_reversed"),
    "bug_path_float32_cancellation": ("path", OT, {}, "u_t", "precision_near_t1"),
    "bug_field_nearest_component": ("field", OT_MIN, {}, "u", "nearest_component"),
    "bug_field_time_reversed": ("field", OT_MIN, {}, "u", "time_reversed"),
    "bug_field_sigma_min_dropped": ("field", OT_MIN, {}, "u", "sigma_min_dropped"),
    "trained_ot_field": ("field", OT_MIN, {}, "u", None),
    "bug_loglik_divergence_sign": ("loglik", OT, {}, "log_p1", "divergence_sign"),
    "bug_loglik_missing_normaliser": ("loglik", OT, {}, "log_p1", "missing_normaliser"),
    "bug_loglik_hutchinson_uniform_probe": ("loglik", OT, {"n": 32}, "log_p1", "biased_trace_estimate"),
    "bug_path_float16_five_percent": ("path", OT, {}, "x_t", None),
    "bug_path_own_noise_sigma_squared": ("path", OT_MIN, {}, "x_t_law", None),
    "bug_path_noise_redrawn": ("path", OT_MIN, {}, "u_t_given_x_t", "noise_redrawn"),
    "bug_path_modifies_inputs": ("path", OT_MIN, {}, "inputs", "modified_inputs"),
    "bug_path_outputs_swapped": ("path", OT_MIN, {}, "x_t", "outputs_swapped"),
    "bug_path_repairs_batch": ("path", OT_MIN, {}, "x_t", "repairs_batch"),
    "bug_path_nondeterministic": ("path", OT_MIN, {}, "deterministic", "nondeterministic"),
    "bug_path_nonfinite_and_sigma_min_dropped": ("path", OT_MIN, {}, "u_t", "sigma_min_dropped"),
    "bug_field_arguments_swapped": ("field", OT_MIN, {}, "u", "arguments_swapped"),
    "bug_sampler_euler_t_plus_delta": ("sampler", OT, {}, "mean_log_prob", None),
    "bug_sampler_wrong_variance": ("sampler", OT, {}, "moments", "wrong_spread"),
    "bug_sampler_time_reversed": ("sampler", OT, {}, "mean_log_prob", "time_reversed"),
    "bug_sampler_unseeded": ("sampler", OT, {}, "seeded", "seed_ignored"),
    "bug_guided_off_by_one": ("guided", OT_MIN, {"convention": "notes"}, "u_guided", "guidance_off_by_one"),
    "bug_guided_swapped": ("guided", OT_MIN, {}, "u_guided", "guidance_swapped"),
    "bug_guided_null_as_class0": ("guided", OT_MIN, {}, "u_guided", "null_prompt_as_class"),
}
"""Planted bugs: (kind, case, options, the property that must fail, the cause it must name or None)."""
