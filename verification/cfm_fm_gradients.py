"""CFM and FM have the same gradient (eq 20-24).

With the same draws (t, x_0, x_1) and x_t = sigma_t x_0 + alpha_t x_1 in both losses,

    grad l_CFM - grad l_FM = 2 J_theta(x_t)^T ( u_t(x_t) - u_t(x_t | x_1) )      per sample,

which has mean zero because u_t(x) = E[u_t(x | x_1) | x_t = x] (eq 19; eq 23-24).
For a model linear in its parameters, u_theta = W phi(t, x), J^T g = g phi^T, so
everything below is plain NumPy.

    python verification/cfm_fm_gradients.py [--quick]
"""
import sys

import numpy as np
from autograd import grad

import refflow as rf
from refflow.gradients import LinearFeatureModel, exact_cfm_gradient
from refflow.losses import cfm_loss, fm_loss
from refflow.stats import EXACT_TOL, bonferroni_z, rel_err

from common import Table, finish, parse_args, run_registered


def per_sample_differences(model, u_cond, u_marg, t, x_t):
    """Rows 2 (u_t(x) - u_t(x|x_1)) phi(t, x)^T, flattened like W: the per-sample gradient differences."""
    phi = model.features(t, x_t)                                       # (N, m)
    return (2.0 * (u_marg - u_cond)[:, :, None] * phi[:, None, :]).reshape(len(t), -1)


def z_scores(D):
    return D.mean(axis=0) / (D.std(axis=0, ddof=1) / np.sqrt(D.shape[0]))


def main():
    args = parse_args(__doc__.splitlines()[0])
    rng = np.random.default_rng(1)
    target = rf.random_mixture(2, 4, rng, mean_scale=1.5)
    model = LinearFeatureModel(2, 8, rng)
    theta = model.init_params(rng)
    N = 4000
    core = Table(f"Core computation: linear-feature model ({model.n_params} parameters), N = {N} common draws")

    for path, t_max in ((rf.OTPath(), 1.0), (rf.VPPath(), 0.95)):
        marginal = target.marginal(path)
        x_1 = target.sample(N, rng)
        x_0 = rng.standard_normal(x_1.shape)
        t = rng.uniform(0.0, t_max, N)
        x_t = path.sample(x_0, x_1, t)                                  # eq 26
        u_cond = path.target(x_0, x_1, t)                               # eq 29 (x_1 - x_0 for OT, eq 37)
        u_marg = marginal.velocity(x_t, t)                              # eq 19, closed form
        D = per_sample_differences(model, u_cond, u_marg, t, x_t)
        tol = bonferroni_z(D.shape[1])
        core.compare(f"{path.name}: max |z| of mean(grad l_CFM - grad l_FM) over parameters",
                     np.abs(z_scores(D)).max(), tol)

        # The rows add up to the gradients of the two batch losses (autograd through refflow.losses).
        g_cfm = grad(lambda p: cfm_loss(model, p, path, x_0, x_1, t))(theta)
        g_fm = grad(lambda p: fm_loss(model, p, marginal, x_t, t))(theta)
        core.compare(f"{path.name}: mean of the rows vs grad cfm_loss - grad fm_loss (rel.)",
                     rel_err(D.mean(axis=0), g_cfm - g_fm), EXACT_TOL)

        # eq 21-22: L_CFM - L_FM changes with theta only through -2 mean <u_theta, u_c - u_m>, of mean zero.
        theta_b = 3.0 * model.init_params(rng)
        e = [np.sum((model.apply(p, t, x_t) - u_cond) ** 2 - (model.apply(p, t, x_t) - u_marg) ** 2, axis=1)
             for p in (theta, theta_b)]
        core.compare(f"{path.name}: |z| of [L_CFM - L_FM](theta_b) - [L_CFM - L_FM](theta_a)",
                     abs(z_scores((e[1] - e[0])[:, None])[0]), bonferroni_z(1))

        # Exact: averaged over the posterior of x_1 given x_t in closed form, CFM's gradient IS FM's.
        x, s = x_t[:64], t[:64]
        core.compare(f"{path.name}: posterior-averaged CFM gradient vs FM gradient at fixed (t, x)",
                     rel_err(exact_cfm_gradient(model, theta, target, path, x, s),
                             grad(lambda p: fm_loss(model, p, marginal, x, s))(theta)), EXACT_TOL)

        if path.name == "vp":
            # Planted bug: the conditional target without its sigma' x_0 term (eq 31 without sigma'/sigma (x - mu)).
            u_wrong = path.d_alpha(t)[:, None] * x_1
            D_wrong = per_sample_differences(model, u_wrong, u_marg, t, x_t)
            core.control("vp: max |z| with the sigma' term of the conditional target dropped",
                         np.abs(z_scores(D_wrong)).max(), tol)

    names = ["gradients.cfm_fm_monte_carlo", "gradients.cfm_fm_exact", "gradients.cfm_minus_fm_theta_free"]
    if not args.quick:
        names.append("gradients.mc_rate")
    registered = run_registered(names, args.quick)
    return finish(core, registered)


if __name__ == "__main__":
    sys.exit(main())
