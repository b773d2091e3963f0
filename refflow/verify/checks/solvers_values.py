"""Value checks of the fixed-step solvers: the discrete states themselves, at arbitrary recorded times.

``solvers.order`` fits convergence slopes; a scheme that evaluates the field
at the wrong time inside a step keeps its slope.  Here each method is run on
the scalar linear field :math:`u_t(x) = a(t)\\,x` (applied to every
coordinate), for which one step of every explicit Runge-Kutta method
multiplies the state by a growth factor :math:`R(t, \\delta)` that is a
polynomial in the stage values :math:`a(t), a(t + \\delta/2), a(t + \\delta)`.
The states at ``t_eval = 0.29, 0.5, 0.73`` (step 0.01) and at the end must be
the products of those factors, forwards and backwards in time.
"""
from __future__ import annotations

import numpy as np

from refflow.solvers import integrate
from refflow.stats import rel_err
from refflow.verify.registry import Outcome, register

DISCRETE_TOL = 1e-12
"""Relative error allowed between two float64 evaluations of a product of 100 factors near 1."""


def _a(t):
    return np.cos(3.0 * t) + 2.0 * t - 0.5


def growth(method, t, delta):
    """One step's growth factor of ``method`` for u = a(t) x (written from the method's tableau)."""
    a0, ah, a1 = _a(t), _a(t + 0.5 * delta), _a(t + delta)
    h = 0.5 * delta
    if method == "euler":
        return 1.0 + delta * a0
    if method == "midpoint":
        return 1.0 + delta * ah * (1.0 + h * a0)
    if method == "heun":
        return 1.0 + h * (a0 + a1 * (1.0 + delta * a0))
    if method == "rk4":
        g2 = ah * (1.0 + h * a0)            # k_2 / x
        g3 = ah * (1.0 + h * g2)            # k_3 / x
        g4 = a1 * (1.0 + delta * g3)        # k_4 / x
        return 1.0 + delta / 6.0 * (a0 + 2.0 * g2 + 2.0 * g3 + g4)
    raise ValueError(method)


def discrete_states(method, t0, t1, n_steps, t_eval, x, shift=0):
    """The exact discrete states at ``t_eval`` and at ``t1``; ``shift=1`` plants the next-grid-time bug."""
    delta = (t1 - t0) / n_steps
    factors = [growth(method, t0 + (k + shift) * delta, delta) for k in range(n_steps)]
    cum = np.concatenate([[1.0], np.cumprod(factors)])
    k_eval = np.rint((np.asarray(t_eval) - t0) / delta).astype(int)
    return cum[k_eval][:, None, None] * x[None], cum[-1] * x


@register("solvers.fixed_step_values", equations="6, 8-10 (Algorithm 2)", quick=True)
def check_fixed_step_values(rng, quick):
    x = rng.standard_normal((5, 2))
    errors, control = {}, []
    for method in ("euler", "midpoint", "heun", "rk4"):
        for t0, t1, t_eval in ((0.0, 1.0, [0.29, 0.5, 0.73]), (1.0, 0.0, [0.71, 0.5, 0.27])):
            sol = integrate(lambda t, z: _a(t) * z, x, t0, t1, method=method, n_steps=100, t_eval=t_eval)
            xs_ref, x_ref = discrete_states(method, t0, t1, 100, t_eval, x)
            errors[f"{method} {t0}->{t1}"] = max(rel_err(sol.x, x_ref), rel_err(sol.xs, xs_ref),
                                                 rel_err(sol.ts, t_eval))
            if method == "euler":
                # Planted bug: every step evaluates the field at the next grid time.
                xs_bad, x_bad = discrete_states(method, t0, t1, 100, t_eval, x, shift=1)
                control.append(max(rel_err(x_bad, x_ref), rel_err(xs_bad, xs_ref)))
    return Outcome(
        compared="euler, midpoint, heun, rk4 on u = a(t) x, 100 steps forwards and backwards: the final state and "
                 "the states at t_eval = 0.29, 0.5, 0.73 (0.71, 0.5, 0.27 backwards) vs products of the "
                 "methods' growth factors",
        error=max(errors.values()), tolerance=DISCRETE_TOL,
        why="the same discrete map evaluated two ways in float64: rounding of ~100 products only",
        control="Euler steps that evaluate the field at the step's end time t_{k+1}",
        control_error=min(control), details=errors,
    )
