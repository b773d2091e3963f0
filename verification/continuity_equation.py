"""The continuity (transport) equation (eq 11) for the closed-form marginal path and field.

eq 11:  d/dt p_t(x) = - div( p_t u_t )(x),

divided by p_t, with div(p u) = p div u + <grad p, u>:

    d/dt log p_t(x) + div u_t(x) + <grad_x log p_t(x), u_t(x)> = 0.

Every derivative is taken by autograd of the closed forms of log p_t (eq 16)
and u_t (eq 19); the residual must vanish to rounding.

    python verification/continuity_equation.py [--quick]
"""
import sys

import autograd.numpy as anp
import numpy as np
from autograd import elementwise_grad

import refflow as rf
from refflow.autodiff import divergence
from refflow.stats import EXACT_TOL

from common import Table, finish, parse_args, run_registered


def relative_residual(log_prob, velocity, x, t):
    """|d/dt log p + div u + <grad log p, u>| over the sum of the terms' sizes, per point (max)."""
    dlogp_dt = elementwise_grad(lambda s: log_prob(x, s))(t)                  # d/dt log p_t(x)
    score = elementwise_grad(lambda z: anp.sum(log_prob(z, t)))(x)           # grad_x log p_t(x)
    u = velocity(x, t)
    div_u = divergence(lambda z: velocity(z, t), x)                           # tr du/dx
    transport = np.sum(score * u, axis=1)
    residual = dlogp_dt + div_u + transport
    return float(np.max(np.abs(residual) / (np.abs(dlogp_dt) + np.abs(div_u) + np.abs(transport))))


def main():
    args = parse_args(__doc__.splitlines()[0])
    rng = np.random.default_rng(2)
    target = rf.random_mixture(3, 4, rng, mean_scale=1.5)
    core = Table("Core computation: random 3-D mixture, 32 points x ~ p_t, t ~ U(0, 1), autograd derivatives")
    for path in (rf.OTPath(), rf.VPPath(), rf.VEPath(0.01, 5.0), rf.CosinePath()):
        marginal = target.marginal(path)
        t = rng.uniform(0.0, 1.0, 32)
        x = marginal.sample(32, t, rng)
        core.compare(f"eq 11 residual, {path!r}", relative_residual(marginal.log_prob, marginal.velocity, x, t),
                     EXACT_TOL)
    # Planted bug: the VP density transported by the OT marginal field (a field of another path).
    vp, ot = target.marginal(rf.VPPath()), target.marginal(rf.OTPath())
    t = rng.uniform(0.0, 1.0, 32)
    x = vp.sample(32, t, rng)
    core.control("VP density with the OT path's marginal field", relative_residual(vp.log_prob, ot.velocity, x, t),
                 EXACT_TOL)

    # --quick leaves out targets.continuity (the same residual as above, on more paths and targets: seconds)
    names = ["targets.score_divergence"] if args.quick else ["targets.continuity", "targets.score_divergence"]
    registered = run_registered(names, args.quick)
    return finish(core, registered)


if __name__ == "__main__":
    sys.exit(main())
