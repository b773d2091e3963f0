r"""Checks of the notes' Figure 2: conditional flows are straight and cross, marginal flows do not cross.

The trajectories, the crossing count and the exact 1-D quantile flow are in
:mod:`refflow.figures` (whose docstring says precisely what is counted and
why the ODE uniqueness theorem forbids crossings of marginal flows in the
:math:`(t, x)` plane).  Three checks:

``figure2.crossings`` (eq 8–10, 19, 26, 35)
    No pair of marginal trajectories crosses; the count is trusted only if
    the smallest separation of two trajectories exceeds the ODE error many
    times over, and if the counter finds exactly the crossings of the straight
    conditional lines (pairs in opposite order at the two ends).
``figure2.quantile_flow`` (eq 8–10, 16, 19)
    The marginal trajectories equal the exact order-preserving transport
    :math:`F_t^{-1}(F_0(x_0))` within the solver's tolerance.
``figure2.straightness`` (eq 26, 34–35)
    Conditional OT flows are straight lines at constant velocity: zero chord
    deviation and zero acceleration.

Negative controls: the per-sample conditional field run through the same
solver (straight lines: they cross, and miss the quantile flow); the
marginal field with time reversed; the straightness measure applied to the
curved marginal flows.
"""
from __future__ import annotations

import numpy as np

from refflow.figures import (
    chord_deviation,
    count_crossings,
    curvature,
    figure2_data,
    line_crossings,
    marginal_acceleration,
    plot_figure2,
    marginal_trajectories,
    pair_acceleration,
    quantile_transport,
)
from refflow.verify.checks.solvers import SCIPY_BOUNDS, normalised_error
from refflow.verify.registry import Outcome, register
from refflow.stats import EXACT_TOL

__all__ = ["RTOL", "ATOL", "SEPARATION_MARGIN", "per_sample_field", "time_reversed_field", "min_separation",
           "transport_error"]

RTOL, ATOL = 1e-10, 1e-12
"""Tolerances of the DOP853 solves of the marginal flow."""

SEPARATION_MARGIN = 100.0
"""The zero crossing count is trusted only when the closest approach of two
marginal trajectories is this many times larger than their largest error
against the exact flow: then no sign change can be a numerical artefact."""


def per_sample_field(path, x_0, x_1):
    """Planted "marginal" field: each particle follows its own conditional field
    u_t(x | x_1^(i)) (eq 35 for OT), which is what the conditional flows do."""
    return lambda t, x: path.pair_velocity(x_0, x_1, t)


def time_reversed_field(marginal):
    """Planted "marginal" field with time reversed: u_{1-t}(x)."""
    return lambda t, x: marginal.velocity(x, 1.0 - t)


def min_separation(trajectories) -> float:
    """Smallest distance between two different 1-D trajectories at a common grid time."""
    X = np.asarray(trajectories)[:, :, 0]
    gaps = np.diff(np.sort(X, axis=1), axis=1)
    return float(gaps.min())


def transport_error(data, trajectories):
    """SciPy's RMS error norm of ``trajectories`` against the exact quantile flow, over SciPy's DOP853 bound,
    and the largest absolute error."""
    exact = quantile_transport(data["target"], data["path"], data["x_0"], data["ts"])
    magnitude = np.max(np.abs(exact), axis=0)[None]
    norm = normalised_error(trajectories, exact, RTOL, ATOL, magnitude) / SCIPY_BOUNDS["DOP853"]
    return norm, float(np.max(np.abs(trajectories - exact)))


@register("figure2.crossings", equations="8-10, 19, 26, 35; Figure 2", quick=True)
def check_crossings(rng, quick):
    data = figure2_data(rng, n=40)
    n_marginal, _ = count_crossings(data["marginal_flow"])
    n_conditional, _ = count_crossings(data["conditional"])
    n_lines = line_crossings(data["x_0"], data["x_1"])
    separation = min_separation(data["marginal_flow"])
    _, max_error = transport_error(data, data["marginal_flow"])
    trusted = n_conditional == n_lines and separation > SEPARATION_MARGIN * max_error
    planted = marginal_trajectories(data["marginal"], data["x_0"], data["ts"], rtol=RTOL, atol=ATOL,
                                    field=per_sample_field(data["path"], data["x_0"], data["x_1"]))
    n_planted, _ = count_crossings(planted)
    n = data["x_0"].shape[0]
    return Outcome(
        compared=f"pairs among {n} marginal trajectories (closed-form field eq 19, DOP853 rtol {RTOL:g}) "
                 "whose (t, x) curves intersect, i.e. whose separation changes sign on a grid of "
                 f"{data['ts'].size} times (1-D data, OT path, sigma_min = 0)",
        error=float(n_marginal) if trusted else float("inf"), tolerance=0.0,
        measure='count of crossing pairs',
        why="uniqueness of ODE solutions: trajectories of a locally Lipschitz field never meet, so in 1-D "
            "their order never changes. The count is trusted (else error = inf) only if the closest approach "
            f"of two trajectories exceeds {SEPARATION_MARGIN:g} x their largest ODE error and the counter "
            "finds exactly the crossings of the straight conditional lines",
        control="the per-sample conditional field (each particle on its own straight line, eq 35) "
                "integrated by the same solver",
        control_error=float(n_planted),
        details={"conditional crossing pairs (counted on the grid)": n_conditional,
                 "conditional crossing pairs (opposite order at the ends)": n_lines,
                 "pairs": n * (n - 1) // 2, "closest approach of marginal trajectories": separation,
                 "largest ODE error": max_error},
        figure=plot_figure2(data),
    )


@register("figure2.quantile_flow", equations="8-10, 16, 19; Figure 2", quick=False)
def check_quantile_flow(rng, quick):
    data = figure2_data(rng, n=40)
    error, max_error = transport_error(data, data["marginal_flow"])
    reversed_flow = marginal_trajectories(data["marginal"], data["x_0"], data["ts"], rtol=RTOL, atol=ATOL,
                                          field=time_reversed_field(data["marginal"]))
    planted = marginal_trajectories(data["marginal"], data["x_0"], data["ts"], rtol=RTOL, atol=ATOL,
                                    field=per_sample_field(data["path"], data["x_0"], data["x_1"]))
    controls = {"time reversed": transport_error(data, reversed_flow)[0],
                "per-sample conditional field": transport_error(data, planted)[0]}
    return Outcome(
        compared="marginal trajectories (DOP853 on the closed-form field, eq 19) vs the exact 1-D flow "
                 "F_t^-1(F_0(x_0)) with F_t the closed-form CDF of p_t (eq 16), at every grid time; "
                 "RMS of error / (atol + rtol max_t |x_t|) over SciPy's bound 5",
        error=error, tolerance=1.0,
        measure="RMS error / (atol + rtol |x|), over SciPy's bound 5",
        why="an order-preserving map carrying p_0 to p_t is unique in 1-D (the quantile map), so it is the "
            "marginal flow; the error is an ODE error, judged in SciPy's norm against SciPy's own bound",
        control="time-reversed marginal field u_(1-t)(x), and the per-sample conditional field; the smaller counts",
        control_error=float(min(controls.values())),
        details={"largest absolute error": max_error, "controls": controls, "rtol": RTOL, "atol": ATOL},
    )


@register("figure2.straightness", equations="26, 34-35; Figure 2", quick=True)
def check_straightness(rng, quick):
    data = figure2_data(rng, n=40)
    ts, path = data["ts"], data["path"]
    x_0, x_1 = data["x_0"], data["x_1"]
    scale = np.max(np.abs(data["conditional"]))
    deviation = float(np.max(chord_deviation(data["conditional"], ts))) / scale
    speed = np.max(np.abs(x_1 - x_0))
    acceleration = max(float(np.max(np.abs(pair_acceleration(path, x_0, x_1, t)))) for t in (0.0, 0.37, 0.81)) / speed
    # The same measures on the marginal flow: curved (the control) and its curvature in the (t, x) plane.
    marginal_flow = data["marginal_flow"]
    marginal_deviation = chord_deviation(marginal_flow, ts) / scale
    n_t, n = marginal_flow.shape[:2]
    x_flat, t_flat = marginal_flow.reshape(-1, 1), np.repeat(ts, n)
    kappa = curvature(data["marginal"].velocity(x_flat, t_flat),
                      marginal_acceleration(data["marginal"], x_flat, t_flat))
    return Outcome(
        compared="conditional OT flows (sigma_min = 0): largest distance from the chord over the largest |x|, and "
                 "|d/dt (x_1 - x_0)| by autograd over the largest speed",
        error=max(deviation, acceleration), tolerance=EXACT_TOL,
        measure='relative deviation from a straight line',
        why="psi_t = (1 - t) x_0 + t x_1 is a straight line at constant velocity (eq 26, 35): exact in float64",
        control="the same chord deviation measured on the marginal flows, which are curved",
        control_error=float(np.max(marginal_deviation)),
        details={"marginal chord deviation / max|x| (median, max)":
                     [float(np.median(marginal_deviation)), float(np.max(marginal_deviation))],
                 "marginal curvature in the (t, x) plane (median, max)": [float(np.median(kappa)), float(np.max(kappa))],
                 "conditional acceleration / speed": acceleration},
    )
