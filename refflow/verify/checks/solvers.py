r"""Checks of the ODE solvers (Algorithm 2, eq 6-10) and of guidance (eq 40).

Ground truth is a flow known in closed form.  For a Gaussian target
:math:`q_1 = \mathcal{N}(m, \operatorname{diag}(s^2))` under the OT path with
:math:`\sigma_\text{min} = 0` (eq 34; :math:`x_t = (1 - t) x_0 + t x_1`, as in
Algorithm 1), the marginal :math:`p_t = \mathcal{N}(t m, \operatorname{diag}(S_t^2))`
with :math:`S_t^2 = (1 - t)^2 + t^2 s^2`, and the marginal field is the
conditional mean of :math:`\dot x_t = x_1 - x_0` given :math:`x_t`:

.. math::

    u_t(x) = m + \frac{\dot S_t}{S_t}\,(x - t m),
    \qquad \frac{\dot S_t}{S_t} = \frac{t s^2 - (1 - t)}{S_t^2}.

Its flow (eq 10) is affine, from any time :math:`a` to any time :math:`b`:

.. math::

    \psi_{a \to b}(x) = b m + \frac{S_b}{S_a}\,(x - a m),

so every solver's error can be measured exactly, forwards and backwards.
"""
from __future__ import annotations

import numpy as np

from refflow import solvers
from refflow.verify.registry import Outcome, register

__all__ = [
    "GaussianOTFlow",
    "fit_order",
    "measure_order",
    "normalised_error",
    "WRONG_RK4",
    "WRONG_MIDPOINT",
    "ORDER_STEPS",
]


class GaussianOTFlow:
    r"""Closed-form marginal field and flow of :math:`\mathcal{N}(m, \mathrm{diag}(s^2))` under the OT path.

    Parameters
    ----------
    m : array_like, shape (d,)
        Target mean.
    s : array_like, shape (d,)
        Target standard deviations (> 0, so :math:`S_t > 0` on [0, 1]).
    """

    def __init__(self, m, s):
        self.m = np.asarray(m, dtype=np.float64)
        self.s = np.asarray(s, dtype=np.float64)
        self.d = self.m.shape[0]

    def S(self, t):
        """Standard deviation of the marginal :math:`p_t`, per dimension."""
        return np.sqrt((1.0 - t) ** 2 + (t * self.s) ** 2)

    def rate(self, t):
        r""":math:`\dot S_t / S_t`, per dimension."""
        return (t * self.s**2 - (1.0 - t)) / ((1.0 - t) ** 2 + (t * self.s) ** 2)

    def velocity(self, t, x):
        """The marginal field :math:`u_t(x)`, a valid ``field(t, x)``."""
        return self.m + self.rate(t) * (x - t * self.m)

    def flow(self, x, a, b):
        r"""The exact flow map :math:`\psi_{a \to b}(x)`."""
        return b * self.m + (self.S(b) / self.S(a)) * (x - a * self.m)


def default_problem() -> GaussianOTFlow:
    # Dimensions that contract, hold and expand along the path, so that no
    # error term cancels by symmetry.
    return GaussianOTFlow(m=[1.0, -2.0, 0.5], s=[0.3, 1.0, 2.0])


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

# Step counts per method: errors well inside the asymptotic regime and well
# above float64 rounding (RK4 at 64 steps: ~1e-9).
ORDER_STEPS = {1: (32, 64, 128, 256), 2: (16, 32, 64, 128), 4: (8, 16, 32, 64)}


def fit_order(deltas, errors) -> float:
    """Least-squares slope of log(error) against log(step size)."""
    return float(np.polyfit(np.log(deltas), np.log(errors), 1)[0])


def measure_order(method, problem, x, t0=0.0, t1=1.0, steps=None):
    """Fit the convergence order of a fixed-step method on ``problem``.

    Returns ``(slope, deltas, errors)`` with ``errors`` the max-abs error of
    the end points against the exact flow.
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
    return fit_order(deltas, errors), np.array(deltas), np.array(errors)


def normalised_error(x, x_true, rtol, atol) -> float:
    """RMS of ``(x - x_true) / (atol + rtol |x_true|)``: SciPy's own error norm."""
    e = (x - x_true) / (atol + rtol * np.abs(x_true))
    return float(np.sqrt(np.mean(e**2)))


@register("solvers.order", "6, 8-10 (Algorithm 2)", quick=True)
def check_order(rng, quick):
    problem = default_problem()
    x = rng.standard_normal((32, problem.d))
    slopes = {}
    for name, method in solvers.FIXED_STEP_METHODS.items():
        fwd, _, _ = measure_order(method, problem, x, 0.0, 1.0)
        bwd, _, _ = measure_order(method, problem, problem.flow(x, 0.0, 1.0), 1.0, 0.0)
        slopes[name] = (fwd, bwd)
    error = max(abs(s - solvers.FIXED_STEP_METHODS[k].order) for k, pair in slopes.items() for s in pair)
    wrong = {}
    for method in (WRONG_RK4, WRONG_MIDPOINT):
        wrong[method.name] = measure_order(method, problem, x, 0.0, 1.0)[0]
    control_error = min(
        abs(wrong[WRONG_RK4.name] - WRONG_RK4.order),
        abs(wrong[WRONG_MIDPOINT.name] - WRONG_MIDPOINT.order),
    )
    return Outcome(
        compared="fitted slope of log error vs log step (euler 1, midpoint 2, heun 2, rk4 4), "
        "forward 0->1 and backward 1->0, on the closed-form Gaussian OT flow",
        error=error,
        tolerance=0.3,
        why="an order-p method has global error C δ^p; a fitted slope within ±0.3 of p "
        "separates neighbouring orders",
        control="RK4 with equal weights 1/4 (order 2) and midpoint evaluated at t instead "
        "of t + δ/2 (order 1), each claimed at its nominal order",
        control_error=control_error,
        details={"slopes (forward, backward)": slopes, "control slopes": wrong},
    )


@register("solvers.solve_ivp", "8-10", quick=True)
def check_solve_ivp(rng, quick):
    problem = default_problem()
    rtol, atol = 1e-8, 1e-10
    x_0 = rng.standard_normal((16, problem.d))
    x_1 = problem.flow(x_0, 0.0, 1.0)
    errors = {}
    for method in solvers.SCIPY_METHODS:
        fwd = solvers.integrate(problem.velocity, x_0, 0.0, 1.0, method=method, rtol=rtol, atol=atol)
        bwd = solvers.integrate(problem.velocity, x_1, 1.0, 0.0, method=method, rtol=rtol, atol=atol)
        errors[method] = (
            normalised_error(fwd.x, x_1, rtol, atol),
            normalised_error(bwd.x, x_0, rtol, atol),
        )
    # Control: time reversed -- treat the source draws as if they sat at t = 1
    # and integrate towards t = 0, compared with the forward truth.
    wrong = solvers.integrate(problem.velocity, x_0, 1.0, 0.0, method="DOP853", rtol=rtol, atol=atol)
    return Outcome(
        compared="solve_ivp end points vs the exact flow psi_{0->1} and psi_{1->0}, "
        "error / (atol + rtol |x|), RMS over the batch (SciPy's norm)",
        error=max(max(pair) for pair in errors.values()),
        tolerance=5.0,
        why="the step-size controller keeps each step's local error near 1 in this norm; "
        "global error accumulates over the steps, and SciPy's own tests allow 5",
        control="integration in the reversed time direction (1 -> 0 instead of 0 -> 1)",
        control_error=normalised_error(wrong.x, x_1, rtol, atol),
        details={"rtol": rtol, "atol": atol, "normalised error (forward, backward)": errors},
    )


def _two_class_field(means, s):
    """A conditional field: the Gaussian OT field of class ``y`` (``-1`` is ∅)."""
    problems = {label: GaussianOTFlow(mean, s) for label, mean in means.items()}

    def field(t, x, y):
        out = np.empty_like(x)
        for label, problem in problems.items():
            rows = y == label
            out[rows] = problem.velocity(t, x[rows])
        return out

    return field, problems


@register("guidance.eq40", "40", quick=True)
def check_guidance(rng, quick):
    # With a common s, the Gaussian OT field is affine in the mean m, so the
    # guided field of eq 40 is exactly the Gaussian field of the mean
    # (1 - w) m_∅ + w m_y: ground truth computed without forming eq 40.
    d = 3
    s = np.array([0.5, 1.0, 1.5])
    means = {-1: np.zeros(d), 0: np.array([2.0, -1.0, 0.5]), 1: np.array([-1.5, 3.0, 1.0])}
    field, problems = _two_class_field(means, s)
    n = 64
    x = 3.0 * rng.standard_normal((n, d))
    y = rng.integers(0, 2, size=n)

    def truth(t, w_notes):
        m_w = (1.0 - w_notes) * means[-1] + w_notes * np.stack([means[int(c)] for c in y])
        return m_w + problems[-1].rate(t) * (x - t * m_w)

    def rel(a, b):
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))

    errors, control = [], []
    for t in (0.0, 0.3, 0.77, 1.0):
        for w in (0.0, 1.0, 2.5, -0.5, 7.0):
            errors.append(rel(solvers.guided_field(field, y, w)(t, x), truth(t, w)))
            w_fm = w - 1.0
            errors.append(rel(solvers.guided_field(field, y, w_fm, "flow_matching")(t, x), truth(t, 1.0 + w_fm)))
            # Control: the flow_matching weighting fed the notes' w unconverted.
            control.append(rel(solvers.guided_field(field, y, w, "flow_matching")(t, x), truth(t, w)))
        # w = 1 (notes) is the conditional field and w = 0 the unconditional one, bit for bit.
        errors.append(rel(solvers.guided_field(field, y, 1.0)(t, x), field(t, x, y)))
        errors.append(rel(solvers.guided_field(field, y, 0.0)(t, x), field(t, x, np.full(n, -1))))
    return Outcome(
        compared="guided field (both conventions, w in {0, 1, 2.5, -0.5, 7}) vs the closed-form "
        "Gaussian field of the mean (1 - w) m_null + w m_y",
        error=max(errors),
        tolerance=1e-10,
        why="exact identity (the field is affine in the mean); only float64 rounding remains",
        control="flow_matching weighting given the notes' w without the shift w_notes = 1 + w_fm",
        control_error=max(control),
        details={"max relative error": max(errors)},
    )


@register("guidance.sampling", "40, Algorithm 2", quick=True)
def check_guided_sampling(rng, quick):
    # Guided sampling from the affine guided field transports N(0, I) to
    # N(m_w, diag(s^2)) along the exact flow with mean m_w.
    d = 2
    s = np.array([0.5, 1.5])
    means = {-1: np.array([0.0, 0.0]), 3: np.array([2.0, -1.0])}
    field, _ = _two_class_field(means, s)
    w = 2.5
    rtol, atol = 1e-8, 1e-10
    sol = solvers.sample(solvers.guided_field(field, 3, w), 32, d, rng, method="DOP853", rtol=rtol, atol=atol)
    m_w = (1.0 - w) * means[-1] + w * means[3]
    exact = GaussianOTFlow(m_w, s).flow(sol.x0, 0.0, 1.0)
    wrong = GaussianOTFlow(means[3], s).flow(sol.x0, 0.0, 1.0)  # unguided target
    return Outcome(
        compared="guided samples (w = 2.5, DOP853) vs the exact flow to N((1 - w) m_null + w m_y, s^2)",
        error=normalised_error(sol.x, exact, rtol, atol),
        tolerance=5.0,
        why="an ODE error normalised by atol + rtol |x| (SciPy's norm and bound)",
        control="the conditional flow without guidance (w = 1) taken as ground truth",
        control_error=normalised_error(sol.x, wrong, rtol, atol),
        details={"nfe": sol.nfe},
    )
