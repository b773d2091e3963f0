"""The shared error measures and thresholds of :mod:`refflow.stats`, pinned to known values.

Every other check passes or fails through these three functions, so a bug in
them would move every verdict at once: ``rel_err`` on negative references,
the two-sided Bonferroni z against the normal quantile written out, and the
fitted slope of an exact power law.
"""
from __future__ import annotations

import numpy as np
from scipy import special

from refflow.stats import EXACT_TOL, FAMILY_ALPHA, bonferroni_z, fit_slope, rel_err
from refflow.verify.registry import Outcome, register


def _two_sided_z(m, alpha=FAMILY_ALPHA):
    # P(|Z| > z) = alpha / m  <=>  z = sqrt(2) erfcinv(alpha / m)
    return float(np.sqrt(2.0) * special.erfcinv(alpha / m))


@register("stats.values", equations="(tolerances of every check)", quick=True)
def check_stats_values(rng, quick):
    errors = {
        "rel_err of negative values": abs(rel_err([-1.0, -2.0], [-1.0, -3.0]) - 1.0 / 3.0),
        "rel_err of zeros": abs(rel_err([0.0], [0.0])),
        "fit_slope of 3 x^2.5": abs(fit_slope([1.0, 2.0, 4.0, 8.0], [3.0 * s**2.5 for s in (1, 2, 4, 8)]) - 2.5),
    }
    for m in (1, 10, 1000):
        errors[f"bonferroni_z({m})"] = abs(bonferroni_z(m) - max(4.0, _two_sided_z(m))) / _two_sided_z(m)
    # Planted bug: a one-sided threshold (alpha / m instead of alpha / (2 m)).
    from scipy import stats as sps
    control = abs(float(sps.norm.isf(FAMILY_ALPHA / 1000)) - _two_sided_z(1000)) / _two_sided_z(1000)
    return Outcome(
        compared="rel_err on known values, bonferroni_z(m) vs sqrt(2) erfcinv(alpha/m) (floored at 4), "
                 "fit_slope of an exact power law",
        error=max(errors.values()), tolerance=EXACT_TOL,
        why="closed forms in float64 (erfcinv vs the normal quantile function): rounding only",
        control="a one-sided Bonferroni threshold", control_error=control, details=errors,
    )
