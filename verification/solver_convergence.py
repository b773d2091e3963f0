"""Convergence orders of the ODE solvers (Algorithm 2, eq 6-10).

Algorithm 2 is Euler's method: x_{t+delta} = x_t + delta u_t(x_t), one residual step
(eq 6) per time step.  Its global error is O(delta); midpoint and Heun are O(delta^2),
RK4 O(delta^4).  Ground truth: a Gaussian target on the cosine path, whose marginal
flow is affine in x and known in closed form (refflow.verify.checks.solvers).  The
fitted slope of log(error) against log(delta) must be within 0.3 of the order.

    python verification/solver_convergence.py [--quick]
"""
import sys

import numpy as np

from refflow import solvers
from refflow.verify.checks.solvers import WRONG_RK4, cosine_problem
from refflow.stats import fit_slope

from common import Table, finish, parse_args, run_registered


def errors(method, problem, x_0, steps):
    """Max-abs error of the end point at t = 1 against the exact flow, per number of steps."""
    exact = problem.flow(x_0, 0.0, 1.0)
    return [np.abs(solvers.integrate(problem.velocity, x_0, 0.0, 1.0, method=method, n_steps=k).x - exact).max()
            for k in steps]


def main():
    args = parse_args(__doc__.splitlines()[0])
    problem = cosine_problem()
    x_0 = np.random.default_rng(5).standard_normal((32, problem.d))
    core = Table("Core computation: slope of log error vs log step size, cosine-path Gaussian flow, 0 -> 1")
    steps = {"euler": (32, 64, 128, 256), "midpoint": (16, 32, 64, 128), "heun": (16, 32, 64, 128),
             "rk4": (16, 32, 64, 128)}
    for name, ks in steps.items():
        e = errors(name, problem, x_0, ks)
        order = solvers.FIXED_STEP_METHODS[name].order
        slope = fit_slope(1.0 / np.array(ks), e)
        print(f"{name:8s} steps {ks}: errors {', '.join(f'{v:.2e}' for v in e)}; slope {slope:.2f}")
        core.compare(f"{name}: |fitted slope - {order}|", abs(slope - order), 0.3)
    # Planted bug: RK4 with equal stage weights 1/4 (second order) claimed as order 4.
    slope = fit_slope(1.0 / np.array(steps["rk4"]), errors(WRONG_RK4, problem, x_0, steps["rk4"]))
    core.control("RK4 with equal weights: |fitted slope - 4|", abs(slope - 4), 0.3)

    registered = run_registered(["solvers.order", "solvers.solve_ivp"], args.quick)
    return finish(core, registered)


if __name__ == "__main__":
    sys.exit(main())
