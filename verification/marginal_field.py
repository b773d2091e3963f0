"""The marginal path and field (eq 16, 19) against their Monte-Carlo definitions.

eq 16:  p_t(x) = E_{x_1 ~ q} [ p_t(x | x_1) ]
eq 19:  u_t(x) = E_{x_1 ~ q} [ u_t(x | x_1) p_t(x | x_1) ] / p_t(x)

For a Gaussian mixture q both have closed forms (refflow.targets).  Here the
integrals are estimated from samples of q, written out in NumPy, and compared
with the closed forms by z-scores.

    python verification/marginal_field.py [--quick]
"""
import sys

import numpy as np

import refflow as rf
from refflow.stats import bonferroni_z

from common import Table, finish, parse_args, run_registered


def main():
    args = parse_args(__doc__.splitlines()[0])
    rng = np.random.default_rng(0)
    target, path = rf.eight_gaussians(), rf.VPPath()
    marginal = target.marginal(path)

    n, M = 8, 20_000                                   # query points, samples of q
    t = 0.45
    x = marginal.sample(n, t, rng)                     # x ~ p_t
    x_1 = target.sample(M, rng)                        # x_1 ~ q
    alpha, sigma = path.alpha(t), path.sigma(t)

    # p_t(x | x_1) = N(x | alpha x_1, sigma^2 I)  (eq 25), for every (point, sample) pair
    diff = x[:, None, :] - alpha * x_1[None, :, :]                       # (n, M, d)
    d = x.shape[1]
    cond_density = np.exp(-0.5 * np.sum(diff**2, axis=2) / sigma**2) / (2 * np.pi * sigma**2) ** (d / 2)

    # eq 16: the mean of p_t(x | x_1) over x_1 ~ q, with its standard error
    p_mc = cond_density.mean(axis=1)
    p_se = cond_density.std(axis=1, ddof=1) / np.sqrt(M)
    z16 = (np.exp(marginal.log_prob(x, t)) - p_mc) / p_se

    # eq 19: self-normalised weights w_j = p_t(x | x_1j) / sum_k p_t(x | x_1k)
    w = cond_density / cond_density.sum(axis=1, keepdims=True)
    u_cond = path.conditional_velocity(                                   # u_t(x | x_1), eq 31
        np.repeat(x, M, axis=0), np.tile(x_1, (n, 1)), t).reshape(n, M, d)
    u_mc = np.einsum("nm,nmd->nd", w, u_cond)
    u_se = np.sqrt(np.einsum("nm,nmd->nd", w**2, (u_cond - u_mc[:, None, :]) ** 2))
    z19 = (marginal.velocity(x, t) - u_mc) / u_se

    # Planted bug: the prior average E_q[u_t(x | x_1)], forgetting the weights p_t(x|x_1) / p_t(x).
    u_prior = u_cond.mean(axis=1)
    prior_se = u_cond.std(axis=1, ddof=1) / np.sqrt(M)
    z_wrong = (marginal.velocity(x, t) - u_prior) / prior_se

    tol = bonferroni_z(z16.size + z19.size)
    core = Table(f"Core computation: eight Gaussians, VP path, t = {t}, {n} points x ~ p_t, {M} samples of q")
    core.compare("eq 16: max |z| of closed-form p_t(x) vs mean of p_t(x|x_1)", np.abs(z16).max(), tol)
    core.compare("eq 19: max |z| of closed-form u_t(x) vs weighted mean of u_t(x|x_1)", np.abs(z19).max(), tol)
    core.control("eq 19 with prior weights 1/M instead of p_t(x|x_1)/p_t(x)", np.abs(z_wrong).max(), tol)
    print(f"effective sample size of the weights: min {1 / np.max(np.sum(w**2, axis=1)):.0f} of {M}")

    # --quick leaves out targets.marginal_monte_carlo (the comparison above on every path and in 8-D: seconds)
    names = ["targets.sampling"] if args.quick else ["targets.marginal_monte_carlo", "targets.sampling"]
    registered = run_registered(names, args.quick)
    return finish(core, registered)


if __name__ == "__main__":
    sys.exit(main())
