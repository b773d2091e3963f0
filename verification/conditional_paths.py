"""Gaussian conditional paths and their fields (eq 25-37), straight OT lines included (eq 35).

eq 26:  psi_t(x_0 | x_1) = sigma_t x_0 + alpha_t x_1            (mu_t(x_1) = alpha_t x_1)
eq 29:  d/dt psi_t       = sigma_t' x_0 + alpha_t' x_1
eq 31:  u_t(x | x_1)     = sigma_t'/sigma_t (x - alpha_t x_1) + alpha_t' x_1
eq 34:  OT: alpha_t = t, sigma_t = 1 - (1 - sigma_min) t
eq 35:  OT: u = x_1 - (1 - sigma_min) x_0, the same at every t: a straight line at constant speed.

    python verification/conditional_paths.py [--quick]
"""
import sys

import numpy as np
from autograd import elementwise_grad

import refflow as rf
from refflow.figures import chord_deviation, conditional_trajectories
from refflow.stats import EXACT_TOL, rel_err

from common import Table, finish, parse_args, run_registered


def d_dt_psi(path, x_0, x_1, t):
    """d/dt psi_t(x_0 | x_1) by autograd, one coordinate at a time (t is per point)."""
    return np.stack([elementwise_grad(lambda s, j=j: path.sample(x_0, x_1, s)[:, j])(t)
                     for j in range(x_0.shape[1])], axis=1)


def main():
    args = parse_args(__doc__.splitlines()[0])
    rng = np.random.default_rng(3)
    n, d = 64, 3
    x_0, x_1 = rng.standard_normal((n, d)), 2.0 * rng.standard_normal((n, d))
    t = rng.uniform(0.0, 0.999, n)
    core = Table("Core computation: 64 pairs (x_0, x_1) in 3-D, t ~ U(0, 0.999)")
    for path in (rf.OTPath(0.0), rf.OTPath(0.05), rf.VPPath(), rf.VEPath(0.01, 5.0), rf.CosinePath()):
        x_t = path.sample(x_0, x_1, t)
        u_29 = path.pair_velocity(x_0, x_1, t)
        core.compare(f"eq 29 vs autograd d/dt psi_t, {path!r}", rel_err(u_29, d_dt_psi(path, x_0, x_1, t)), EXACT_TOL)
        core.compare(f"eq 31 at x = psi_t vs eq 29, {path!r}", rel_err(path.conditional_velocity(x_t, x_1, t), u_29),
                     EXACT_TOL)

    # eq 34: the ends of the OT path; eq 35: constant velocity and zero distance from the chord.
    sigma_min = 0.05
    ot = rf.OTPath(sigma_min)
    b = ot.boundary()
    core.compare("eq 34: |alpha_0| + |sigma_0 - 1| + |alpha_1 - 1| + |sigma_1 - sigma_min|",
                 abs(b["alpha_0"]) + abs(b["sigma_0"] - 1) + abs(b["alpha_1"] - 1) + abs(b["sigma_1"] - sigma_min),
                 1e-15)
    expected = x_1 - (1.0 - sigma_min) * x_0
    core.compare("eq 35: u at t = 0, 0.3, 1 vs x_1 - (1 - sigma_min) x_0",
                 max(rel_err(ot.pair_velocity(x_0, x_1, s), expected) for s in (0.0, 0.3, 1.0)), EXACT_TOL)
    ts = np.linspace(0.0, 1.0, 101)
    lines = conditional_trajectories(ot, x_0, x_1, ts)
    core.compare("eq 35: largest distance of psi_t from its chord / max |x|",
                 chord_deviation(lines, ts).max() / np.abs(lines).max(), EXACT_TOL)

    # Planted bug: eq 31 without the sigma'/sigma (x - alpha x_1) term (VP path).
    vp = rf.VPPath()
    core.control("eq 31 without sigma'/sigma (x - alpha x_1), VP", rel_err(vp.d_alpha(t)[:, None] * x_1,
                                                                           vp.pair_velocity(x_0, x_1, t)), EXACT_TOL)
    # Planted bug: a curved path (the cosine schedule) must be reported as not straight.
    curved = conditional_trajectories(rf.CosinePath(), x_0, x_1, ts)
    core.control("chord distance of the (curved) cosine path", chord_deviation(curved, ts).max() / np.abs(curved).max(),
                 EXACT_TOL)

    registered = run_registered(["paths.derivatives", "paths.boundary", "paths.conditional_velocity",
                                 "figure2.straightness"], args.quick)
    return finish(core, registered)


if __name__ == "__main__":
    sys.exit(main())
