r"""Checks of the ODE solvers (Algorithm 2, eq 6-10) and of guidance (eq 40).

Ground truth is a flow known in closed form.  For a Gaussian target
:math:`q_1 = \mathcal{N}(m, \operatorname{diag}(s^2))` under an affine
Gaussian path :math:`x_t = \sigma_t x_0 + \alpha_t x_1` (eq 25-26) with
:math:`\alpha_0 = 0, \sigma_0 = 1`, the marginal is
:math:`p_t = \mathcal{N}(\alpha_t m, \operatorname{diag}(S_t^2))`,
:math:`S_t^2 = \sigma_t^2 + \alpha_t^2 s^2`, and the marginal field, the
conditional mean of :math:`\dot x_t = \dot\sigma_t x_0 + \dot\alpha_t x_1`
given :math:`x_t`, is affine in :math:`x`:

.. math::

    u_t(x) = \dot\alpha_t m + \frac{\dot S_t}{S_t}\,(x - \alpha_t m),
    \qquad \frac{\dot S_t}{S_t}
      = \frac{\sigma_t \dot\sigma_t + \alpha_t \dot\alpha_t s^2}{S_t^2}.

Its flow (eq 10) from any time :math:`a` to any time :math:`b` is

.. math::

    \psi_{a \to b}(x) = \alpha_b m + \frac{S_b}{S_a}\,(x - \alpha_a m),

so every solver's error is measured exactly, forwards and backwards.

The order check uses the cosine path (:math:`\alpha_t = \sin\frac{\pi t}{2}`,
:math:`\sigma_t = \cos\frac{\pi t}{2}`).  On the OT path of Algorithm 1
(:math:`\alpha_t = t, \sigma_t = 1 - t`) this problem is too special for an
order check: :math:`S_t^2` is a quadratic in :math:`t`, and the midpoint
method measures order 3 there (superconvergence), so a wrong "order 2" claim
would go unnoticed.
"""
from __future__ import annotations

import numpy as np

from refflow import solvers
from refflow.plotting import plot_convergence
from refflow.verify.registry import Outcome, register
from refflow.stats import fit_slope

__all__ = [
    "GaussianPathFlow",
    "ot_problem",
    "cosine_problem",
    "measure_order",
    "normalised_error",
    "WRONG_RK4",
    "WRONG_MIDPOINT",
    "ORDER_STEPS",
    "SCIPY_BOUNDS",
]


class GaussianPathFlow:
    r"""Closed-form marginal field and flow of :math:`\mathcal{N}(m, \mathrm{diag}(s^2))` on an affine path.

    Parameters
    ----------
    m : array_like, shape (d,)
        Target mean.
    s : array_like, shape (d,)
        Target standard deviations (> 0, so :math:`S_t > 0` on [0, 1]).
    alpha_t, sigma_t, d_alpha_t, d_sigma_t : callable
        The path schedule and its time derivatives, with
        :math:`\alpha_0 = 0`, :math:`\sigma_0 = 1`.
    """

    def __init__(self, m, s, alpha_t, sigma_t, d_alpha_t, d_sigma_t):
        self.m = np.asarray(m, dtype=np.float64)
        self.s = np.asarray(s, dtype=np.float64)
        self.d = self.m.shape[0]
        self.alpha_t, self.sigma_t = alpha_t, sigma_t
        self.d_alpha_t, self.d_sigma_t = d_alpha_t, d_sigma_t

    def S(self, t):
        """Standard deviation of the marginal :math:`p_t`, per dimension."""
        return np.sqrt(self.sigma_t(t) ** 2 + (self.alpha_t(t) * self.s) ** 2)

    def rate(self, t):
        r""":math:`\dot S_t / S_t`, per dimension."""
        a, sg = self.alpha_t(t), self.sigma_t(t)
        num = sg * self.d_sigma_t(t) + a * self.d_alpha_t(t) * self.s**2
        return num / (sg**2 + (a * self.s) ** 2)

    def velocity(self, t, x):
        """The marginal field :math:`u_t(x)`, a valid ``field(t, x)``."""
        return self.d_alpha_t(t) * self.m + self.rate(t) * (x - self.alpha_t(t) * self.m)

    def flow(self, x, a, b):
        r"""The exact flow map :math:`\psi_{a \to b}(x)`."""
        return self.alpha_t(b) * self.m + (self.S(b) / self.S(a)) * (x - self.alpha_t(a) * self.m)

    def path_max(self, x, a, b, n_grid=2001):
        r""":math:`\max_{t \in [a, b]} |\psi_{a \to t}(x)|` per entry, on a fine grid."""
        ts = np.linspace(a, b, n_grid)
        return np.max(np.abs([self.flow(x, a, t) for t in ts]), axis=0)


# Dimensions that contract, hold and expand along the path, so that no error
# term cancels by symmetry.
_M = (1.0, -2.0, 0.5)
_S = (0.3, 1.0, 2.0)


def ot_problem(m=_M, s=_S) -> GaussianPathFlow:
    """The OT path of Algorithm 1 (eq 34 with sigma_min = 0): alpha = t, sigma = 1 - t."""
    return GaussianPathFlow(
        m, s, lambda t: t, lambda t: 1.0 - t, lambda t: 1.0, lambda t: -1.0,
    )


def cosine_problem(m=_M, s=_S) -> GaussianPathFlow:
    """The cosine path: alpha = sin(pi t / 2), sigma = cos(pi t / 2)."""
    h = 0.5 * np.pi
    return GaussianPathFlow(
        m, s,
        lambda t: np.sin(h * t), lambda t: np.cos(h * t),
        lambda t: h * np.cos(h * t), lambda t: -h * np.sin(h * t),
    )


# Deliberately wrong methods (negative controls).


def _rk4_equal_weights_step(u, t, delta, x_t):
    # RK4 stages with weights 1/4 each instead of 1/6, 1/3, 1/3, 1/6: still
    # consistent and second order (sum b_i c_i = 1/2), but not fourth.
    half = 0.5 * delta
    k_1 = u(t, x_t)
    k_2 = u(t + half, x_t + half * k_1)
    k_3 = u(t + half, x_t + half * k_2)
    k_4 = u(t + delta, x_t + delta * k_3)
    return x_t + (delta / 4.0) * (k_1 + k_2 + k_3 + k_4)


def _midpoint_wrong_time_step(u, t, delta, x_t):
    # Midpoint with the second stage evaluated at t instead of t + δ/2: first
    # order for a time-dependent field.
    x_mid = x_t + (0.5 * delta) * u(t, x_t)
    return x_t + delta * u(t, x_mid)


WRONG_RK4 = solvers.FixedStepMethod("rk4_equal_weights", 4, 4, _rk4_equal_weights_step)
"""RK4 with equal weights, claimed to be order 4 (it is order 2)."""

WRONG_MIDPOINT = solvers.FixedStepMethod("midpoint_wrong_time", 2, 2, _midpoint_wrong_time_step)
"""Midpoint with its second stage at the wrong time, claimed order 2 (it is order 1)."""

# Step counts per method order: errors inside the asymptotic regime and far
# above float64 rounding (RK4 at 128 steps: ~1e-10).
ORDER_STEPS = {1: (32, 64, 128, 256), 2: (16, 32, 64, 128), 4: (16, 32, 64, 128)}

# SciPy controls each step's local error, not the global error; the bound on
# the global error in the norm below is the one SciPy's own test-suite
# (scipy/integrate/_ivp/tests/test_ivp.py) asserts: 5, and 10 for BDF on a
# linear system.
SCIPY_BOUNDS = {"RK23": 5.0, "RK45": 5.0, "DOP853": 5.0, "Radau": 5.0, "BDF": 10.0, "LSODA": 5.0}


def measure_order(method, problem, x, t0=0.0, t1=1.0, steps=None):
    r"""Fit the convergence order of a fixed-step method on ``problem``.

    Returns ``(slope, deltas, errors)`` with ``errors`` the max-abs error of
    the end points against the exact flow :math:`\psi_{t_0 \to t_1}`.
    """
    if isinstance(method, str):
        method = solvers.FIXED_STEP_METHODS[method]
    steps = ORDER_STEPS[method.order] if steps is None else steps
    exact = problem.flow(x, t0, t1)
    deltas, errors = [], []
    for n_steps in steps:
        sol = solvers.integrate(problem.velocity, x, t0, t1, method=method, n_steps=n_steps)
        deltas.append(abs(t1 - t0) / n_steps)
        errors.append(float(np.max(np.abs(sol.x - exact))))
    return fit_slope(deltas, errors), np.array(deltas), np.array(errors)


def normalised_error(x, x_true, rtol, atol, magnitude=None) -> float:
    """RMS of ``(x - x_true) / (atol + rtol * magnitude)``, SciPy's error norm.

    ``magnitude`` defaults to ``|x_true|``; pass the largest ``|x_t|`` along
    the path instead, which is what SciPy's step control scales by (an entry
    that crosses zero near the end would otherwise be judged by atol alone).
    """
    magnitude = np.abs(x_true) if magnitude is None else magnitude
    e = (x - x_true) / (atol + rtol * magnitude)
    return float(np.sqrt(np.mean(e**2)))


@register("solvers.order", "6, 8-10 (Algorithm 2)", quick=True)
def check_order(rng, quick):
    problem = cosine_problem()
    x = rng.standard_normal((32, problem.d))
    x_1 = problem.flow(x, 0.0, 1.0)
    slopes, curves = {}, {}
    for name, method in solvers.FIXED_STEP_METHODS.items():
        forward, deltas, errors = measure_order(method, problem, x, 0.0, 1.0)
        backward = measure_order(method, problem, x_1, 1.0, 0.0)[0]
        slopes[name] = (forward, backward)
        curves[f"{name} (order {method.order})"] = (deltas, errors, forward)
    error = max(
        abs(slope - solvers.FIXED_STEP_METHODS[name].order)
        for name, pair in slopes.items() for slope in pair
    )
    wrong = {m.name: measure_order(m, problem, x, 0.0, 1.0)[0] for m in (WRONG_RK4, WRONG_MIDPOINT)}
    control_error = min(
        abs(wrong[WRONG_RK4.name] - WRONG_RK4.order),
        abs(wrong[WRONG_MIDPOINT.name] - WRONG_MIDPOINT.order),
    )
    return Outcome(
        compared="fitted slope of log error vs log step (euler 1, midpoint 2, heun 2, rk4 4), "
        "forward 0->1 and backward 1->0, on the closed-form Gaussian flow of the cosine path",
        error=error,
        measure='|fitted slope - order| (slope miss)',
        tolerance=0.3,
        why="an order-p method has global error C δ^p + O(δ^(p+1)); a slope within ±0.3 of p "
        "separates neighbouring orders",
        control="RK4 with equal weights 1/4 (order 2) and midpoint with its second stage at t "
        "instead of t + δ/2 (order 1), each claimed at its nominal order; the smaller miss counts",
        control_error=control_error,
        details={"slopes (forward, backward)": slopes, "control slopes": wrong},
        figure=plot_convergence(curves, "fixed-step methods, forward 0 -> 1"),
    )


@register("solvers.solve_ivp", "8-10", quick=True)
def check_solve_ivp(rng, quick):
    rtol, atol = 1e-5, 1e-7
    ratios, control = {}, []
    for label, problem in (("ot", ot_problem()), ("cosine", cosine_problem())):
        x_0 = rng.standard_normal((16, problem.d))
        x_1 = problem.flow(x_0, 0.0, 1.0)
        magnitude = problem.path_max(x_0, 0.0, 1.0)
        for method in solvers.SCIPY_METHODS:
            fwd = solvers.integrate(problem.velocity, x_0, 0.0, 1.0, method=method, rtol=rtol, atol=atol)
            bwd = solvers.integrate(problem.velocity, x_1, 1.0, 0.0, method=method, rtol=rtol, atol=atol)
            bound = SCIPY_BOUNDS[method]
            ratios[f"{label} {method}"] = (
                normalised_error(fwd.x, x_1, rtol, atol, magnitude) / bound,
                normalised_error(bwd.x, x_0, rtol, atol, magnitude) / bound,
            )
        # Control: time reversed -- the source draws treated as if they sat at
        # t = 1 and carried towards t = 0, judged against the forward truth.
        wrong = solvers.integrate(problem.velocity, x_0, 1.0, 0.0, method="RK45", rtol=rtol, atol=atol)
        control.append(normalised_error(wrong.x, x_1, rtol, atol, magnitude) / SCIPY_BOUNDS["RK45"])
    return Outcome(
        compared="solve_ivp end points (all methods, OT and cosine paths) vs the exact flows "
        "psi_{0->1} and psi_{1->0}; RMS of error / (atol + rtol max_t |x_t|), divided by the "
        "bound SciPy's tests use for the method",
        error=max(max(pair) for pair in ratios.values()),
        measure="RMS error / (atol + rtol |x|), over SciPy's bound",
        tolerance=1.0,
        why="the step control keeps each step's local error near 1 in this norm; the global "
        "error accumulates, and SciPy's own tests bound it by 5 (10 for BDF)",
        control="integration in the reversed time direction (1 -> 0 instead of 0 -> 1)",
        control_error=min(control),
        details={"rtol": rtol, "atol": atol, "error / bound (forward, backward)": ratios},
    )


def _class_field(means, s):
    """A conditional field: the OT-path Gaussian field of class ``y`` (``-1`` is ∅)."""
    problems = {label: ot_problem(mean, s) for label, mean in means.items()}

    def field(t, x, y):
        out = np.empty_like(x)
        for label, problem in problems.items():
            rows = y == label
            out[rows] = problem.velocity(t, x[rows])
        return out

    return field, problems


@register("guidance.eq40", "40", quick=True)
def check_guidance(rng, quick):
    # With a common s the Gaussian field is affine in the mean m, so the guided
    # field of eq 40 is exactly the Gaussian field of the mean
    # (1 - w) m_∅ + w m_y: a ground truth computed without forming eq 40.
    d = 3
    s = np.array([0.5, 1.0, 1.5])
    means = {-1: np.zeros(d), 0: np.array([2.0, -1.0, 0.5]), 1: np.array([-1.5, 3.0, 1.0])}
    field, problems = _class_field(means, s)
    n = 64
    x = 3.0 * rng.standard_normal((n, d))
    y = rng.integers(0, 2, size=n)
    m_y = np.stack([means[int(c)] for c in y])

    def truth(t, w_notes):
        m_w = (1.0 - w_notes) * means[-1] + w_notes * m_y
        return problems[-1].d_alpha_t(t) * m_w + problems[-1].rate(t) * (x - problems[-1].alpha_t(t) * m_w)

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))

    errors, control = [], []
    for t in (0.0, 0.3, 0.77, 1.0):
        for w in (0.0, 1.0, 2.5, -0.5, 7.0):
            errors.append(rel(solvers.guided_field(field, y, w)(t, x), truth(t, w)))
            w_fm = w - 1.0
            errors.append(rel(solvers.guided_field(field, y, w_fm, "flow_matching")(t, x), truth(t, 1.0 + w_fm)))
            # Control: the flow_matching weighting fed the notes' w unconverted.
            control.append(rel(solvers.guided_field(field, y, w, "flow_matching")(t, x), truth(t, w)))
        # w = 1 (notes) is the conditional field and w = 0 the unconditional one.
        errors.append(rel(solvers.guided_field(field, y, 1.0)(t, x), field(t, x, y)))
        errors.append(rel(solvers.guided_field(field, y, 0.0)(t, x), field(t, x, np.full(n, -1))))
    return Outcome(
        compared="guided field (both conventions, w_notes in {0, 1, 2.5, -0.5, 7}, 4 times) vs "
        "the closed-form Gaussian field of the mean (1 - w) m_null + w m_y",
        error=max(errors),
        tolerance=1e-10,
        why="exact identity (the field is affine in the mean); only float64 rounding remains",
        control="flow_matching weighting given the notes' w without the shift w_notes = 1 + w_fm",
        control_error=max(control),
        details={"max relative error": max(errors)},
    )


@register("guidance.sampling", "40, Algorithm 2", quick=True)
def check_guided_sampling(rng, quick):
    # The guided field here is the Gaussian field of the mean m_w, so guided
    # sampling carries N(0, I) to N(m_w, diag(s^2)) along a known flow.
    d = 2
    s = np.array([0.5, 1.5])
    means = {-1: np.array([0.0, 0.0]), 3: np.array([2.0, -1.0])}
    field, _ = _class_field(means, s)
    w = 2.5
    rtol, atol = 1e-5, 1e-7
    sol = solvers.sample(solvers.guided_field(field, 3, w), 32, d, rng, method="DOP853", rtol=rtol, atol=atol)
    guided = ot_problem((1.0 - w) * means[-1] + w * means[3], s)
    exact = guided.flow(sol.x0, 0.0, 1.0)
    magnitude = guided.path_max(sol.x0, 0.0, 1.0)
    unguided = ot_problem(means[3], s).flow(sol.x0, 0.0, 1.0)
    return Outcome(
        compared="guided samples (w = 2.5, DOP853) vs the exact flow to N((1 - w) m_null + w m_y, s^2); "
        "RMS of error / (atol + rtol max_t |x_t|) over SciPy's bound 5",
        error=normalised_error(sol.x, exact, rtol, atol, magnitude) / SCIPY_BOUNDS["DOP853"],
        measure="RMS error / (atol + rtol |x|), over SciPy's bound",
        tolerance=1.0,
        why="an ODE error in SciPy's norm, against the bound of SciPy's own tests",
        control="the conditional flow without guidance (w = 1) taken as ground truth",
        control_error=normalised_error(sol.x, unguided, rtol, atol, magnitude) / SCIPY_BOUNDS["DOP853"],
        details={"nfe": sol.nfe},
    )
