"""Checks of the conditional Gaussian paths (eq 17-18, 25-37)."""
from __future__ import annotations

import warnings

import numpy as np
from autograd import elementwise_grad

from refflow.plotting import plot_schedules
from refflow.paths import CosinePath, LinearVPPath, OTPath, PolynomialPath, VEPath, VPPath
from refflow.verify.registry import Outcome, register
from refflow.stats import EXACT_TOL, rel_err


def all_paths():
    """One instance of every path, with a non-zero sigma_min where the path has one."""
    return [OTPath(0.0), OTPath(0.05), VEPath(0.01, 5.0), VPPath(0.1, 20.0),
            CosinePath(), PolynomialPath(3.0), LinearVPPath()]


class _VPHalfMissing(VPPath):
    """Planted bug: alpha_t' without the factor 1/2 of d/dt exp(-T/2)."""

    def _d_alpha(self, t):
        return 2.0 * super()._d_alpha(t)


def derivative_error(path, t):
    """Largest relative error of the path's analytic derivatives against autograd."""
    t_open = t[t < 1.0]  # sigma' is infinite at t = 1 on the VP paths
    with warnings.catch_warnings():
        # autograd warns for constant schedules (alpha = 1) and for sqrt'(0) on
        # the (never used) t = 1 branch of the VP sigma.
        warnings.simplefilter("ignore")
        return _derivative_error(path, t, t_open)


def _derivative_error(path, t, t_open):
    errors = [
        rel_err(path._d_alpha(t), elementwise_grad(path._alpha)(t)),
        rel_err(path._d_sigma(t_open), elementwise_grad(path._sigma)(t_open)),
        rel_err(path._sigma_d_sigma(t), 0.5 * elementwise_grad(lambda s: path._sigma(s) ** 2)(t)),
    ]
    return max(errors)


@register("paths.derivatives", equations="25-34", quick=True)
def check_derivatives(rng, quick):
    t = np.concatenate([[0.0, 1.0], rng.uniform(0.0, 1.0, 64)])
    errors = {repr(p): derivative_error(p, t) for p in all_paths()}
    control = derivative_error(_VPHalfMissing(), t)
    return Outcome(
        compared="alpha', sigma', sigma*sigma' of every path vs autograd derivatives of alpha, sigma "
                 "at t = 0, 1 and 64 random t",
        error=max(errors.values()), tolerance=EXACT_TOL,
        measure='relative error, max|a - b| / max|b|',
        why="exact formulas evaluated in float64: only rounding separates them",
        control="VP path with alpha_t' missing the factor 1/2", control_error=control,
        details={"per_path": errors}, figure=plot_schedules(all_paths()),
    )


def boundary_error(path, sigma_min):
    b = path.boundary()
    return max(abs(b["alpha_0"]), abs(b["sigma_0"] - 1.0), abs(b["alpha_1"] - 1.0), abs(b["sigma_1"] - sigma_min))


@register("paths.boundary", equations="17-18, 34", quick=True)
def check_boundary(rng, quick):
    exact = [(OTPath(0.0), 0.0), (OTPath(0.05), 0.05), (CosinePath(), 0.0),
             (PolynomialPath(3.0), 0.0), (LinearVPPath(), 0.0)]
    errors = {repr(p): boundary_error(p, s) for p, s in exact}
    # Eq 18 writes N(x | x_1, sigma_min I); the path's conditional at t = 1 has
    # standard deviation sigma_min, i.e. covariance sigma_min^2 I.  Measure it.
    path = OTPath(0.05)
    n, d = 200_000, 2
    x_1 = np.zeros((n, d))
    x_t = path.sample(rng.standard_normal((n, d)), x_1, 1.0)
    # Approximate ends, recorded (not required exact): VE and VP do not start at N(0, I).
    approx = {repr(p): p.boundary() for p in (VEPath(0.01, 5.0), VPPath())}
    return Outcome(
        compared="alpha_0 = 0, sigma_0 = 1 (eq 17) and alpha_1 = 1, sigma_1 = sigma_min (eq 18) "
                 "for the OT, cosine, polynomial and linear-VP paths",
        error=max(errors.values()), tolerance=1e-15,
        measure='max absolute error at the ends',
        why="the schedules are written so that the ends are exact in float64",
        control="the VE path (sigma_max = 5), which starts at N(x_1, sigma_max^2 I), not N(0, I)",
        control_error=boundary_error(VEPath(0.01, 5.0), 0.01),
        details={"per_path": errors, "std_at_t1_for_sigma_min_0.05": float(x_t.std()),
                 "approximate_ends": approx},
    )


def conditional_velocity_error(path, x_0, x_1, t, field=None):
    """Compare d/dt psi_t by autograd with eq 29, and eq 31 at x = psi_t(x_0) with eq 29."""
    # d/dt psi_t for each coordinate separately (time is per point).
    dpsi = np.stack([
        elementwise_grad(lambda s, j=j: path.sample(x_0, x_1, s)[:, j])(t) for j in range(x_0.shape[1])
    ], axis=1)
    u_pair = path.pair_velocity(x_0, x_1, t)
    x_t = path.sample(x_0, x_1, t)
    field = field or path.conditional_velocity
    u_point = field(x_t, x_1, t)
    return max(rel_err(u_pair, dpsi), rel_err(u_point, u_pair))


@register("paths.conditional_velocity", equations="26-31, 35", quick=True)
def check_conditional_velocity(rng, quick):
    n, d = 64, 3
    x_0 = rng.standard_normal((n, d))
    x_1 = 2.0 * rng.standard_normal((n, d))
    t = rng.uniform(0.0, 0.999, n)
    errors = {repr(p): conditional_velocity_error(p, x_0, x_1, t) for p in all_paths()}
    # OT: the pair velocity is x_1 - (1 - sigma_min) x_0 at every t (eq 35).
    ot = OTPath(0.05)
    const = max(rel_err(ot.pair_velocity(x_0, x_1, s), x_1 - 0.95 * x_0) for s in (0.0, 0.3, 1.0))
    errors["ot eq 35 constant"] = const

    def dropped(x, x_1, t, path=VPPath()):
        # Planted bug: eq 31 without the sigma'/sigma (x - alpha x_1) term.
        return path._d_alpha(np.asarray(t)[:, None]) * x_1

    control = conditional_velocity_error(VPPath(), x_0, x_1, t, field=dropped)
    return Outcome(
        compared="d/dt psi_t(x_0|x_1) by autograd vs eq 29; eq 31 at x = psi_t(x_0) vs eq 29; "
                 "OT velocity constant in t (eq 35)",
        error=max(errors.values()), tolerance=EXACT_TOL,
        measure='relative error, max|a - b| / max|b|',
        why="exact identities evaluated in float64",
        control="eq 31 with the sigma'/sigma (x - alpha x_1) term dropped (VP path)",
        control_error=control, details={"per_path": errors},
    )
