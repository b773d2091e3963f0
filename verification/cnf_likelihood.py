"""CNF log-likelihood by the instantaneous change of variables (eq 2, 5, 14).

eq 14:  log p_1(x_1) = log p_0(x_0) - int_0^1 div u_t(x_t) dt,   x_t the flow of u through x_1,
eq 2:   log p_1(x_1) = log p_0(psi^-1(x_1)) + log |det J_psi^-1(x_1)|,
eq 5:   for a composition of K residual maps x + delta u (eq 6), the log-determinants add up
        and tend to eq 14 as K -> infinity.

Ground truths: (a) the closed-form marginal log p_1 of a Gaussian mixture (eq 16), reached
by eq 14 driven by its closed-form field (eq 19); (b) a linear field u = A x, whose flow
psi_1 = expm(A) gives eq 2 exactly: p_1 = N(0, expm(A) expm(A)^T).

    python verification/cnf_likelihood.py [--quick]
"""
import sys

import numpy as np
import scipy.linalg
from scipy.stats import multivariate_normal

import refflow as rf
from refflow import cnf
from refflow.verify.checks.cnf import ODE_BOUND

from common import Table, finish, parse_args, run_registered


def main():
    args = parse_args(__doc__.splitlines()[0])
    rng = np.random.default_rng(8)
    core = Table("Core computation: eq 14 by refflow.cnf.log_prob (DOP853, rtol = atol = 1e-10)")

    # (a) a 2-D mixture on the OT path: eq 14 with the closed-form field vs the closed-form log p_1.
    target = rf.random_mixture(2, 3, rng)
    marginal = target.marginal(rf.OTPath())
    field = cnf.marginal_field(marginal)
    x_1 = target.sample(8, rng)
    res = cnf.log_prob(field, x_1, rtol=1e-10, atol=1e-10)
    truth = marginal.log_prob(x_1, 1.0)
    core.compare("mixture: |eq 14 - closed-form log p_1(x_1)|", np.abs(res.log_p - truth).max(), ODE_BOUND)
    # Planted bug: d log p / dt = +div u (the minus sign of eq 13 lost).
    wrong = cnf.log_prob(field, x_1, divergence=lambda t, x: -field.divergence(t, x), rtol=1e-10, atol=1e-10)
    core.control("mixture, divergence sign flipped", np.abs(wrong.log_p - truth).max(), ODE_BOUND)

    # (b) u = A x: psi_1(x_0) = expm(A) x_0, so by eq 2 p_1 = N(0, expm(A) expm(A)^T), and div u = tr A.
    A = 0.6 * rng.standard_normal((3, 3))
    E = scipy.linalg.expm(A)
    x_1 = rng.standard_normal((10, 3)) @ E.T                       # psi_1(x_0) for x_0 ~ N(0, I)
    log_p_eq2 = multivariate_normal(np.zeros(3), E @ E.T).logpdf(x_1)
    res = cnf.log_prob(lambda t, x: x @ A.T, x_1, divergence=lambda t, x: np.full(len(x), np.trace(A)),
                       rtol=1e-10, atol=1e-10)
    core.compare("u = A x: |eq 14 - eq 2 with psi = expm(A)|", np.abs(res.log_p - log_p_eq2).max(), ODE_BOUND)
    core.compare("u = A x: |x_0 from eq 14 - expm(-A) x_1|",
                 np.abs(res.x_0 - x_1 @ scipy.linalg.expm(-A).T).max(), ODE_BOUND)

    # eq 5: K Euler steps x + u/K are K residual layers (eq 6); their summed exact log-determinants
    # approach eq 14 like 1/K.
    x_0 = rng.standard_normal((10, 3))
    gaps = []
    for K in (16, 32, 64):
        euler = cnf.euler_flow_log_prob(lambda t, x: x @ A.T, x_0, K)
        exact = multivariate_normal(np.zeros(3), E @ E.T).logpdf(euler.x_1)
        gaps.append(np.abs(euler.log_p - exact).max())
    order = np.polyfit(np.log([16, 32, 64]), np.log(gaps), 1)[0]
    print(f"eq 5 -> eq 14: |log-likelihood of K residual layers - eq 14 at the same x_1| for K = 16, 32, 64: "
          f"{', '.join(f'{g:.2e}' for g in gaps)}")
    core.compare("eq 5 -> 14: |fitted order in 1/K - 1|", abs(-order - 1.0), 0.3)

    # --quick runs one registered check; the full run all five (tens of seconds)
    names = ["cnf.linear_pushforward"]
    if not args.quick:
        names += ["cnf.closed_form_likelihood", "cnf.hutchinson", "cnf.round_trip", "cnf.continuous_limit"]
    registered = run_registered(names, args.quick)
    return finish(core, registered)


if __name__ == "__main__":
    sys.exit(main())
