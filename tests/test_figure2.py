"""Tests of refflow.figures (the notes' Figure 2) and of the figure2.* checks."""
import numpy as np
import pytest
from matplotlib.figure import Figure

import refflow as rf
from refflow import figures
from refflow.verify.registry import registered, run_check


@pytest.mark.parametrize("name", ["figure2.crossings", "figure2.quantile_flow", "figure2.straightness"])
def test_registered_check_passes_and_catches_its_control(name):
    (entry,) = [e for e in registered() if e.name == name]
    result = run_check(entry, quick=True)
    assert result.error <= result.tolerance, result
    assert result.control_error > result.tolerance, "negative control slipped through"
    assert result.passed


def _lines(x_0, x_1, ts):
    ts = np.asarray(ts)[:, None]
    return ((1 - ts) * np.asarray(x_0, float)[None, :] + ts * np.asarray(x_1, float)[None, :])[:, :, None]


def test_count_crossings_by_hand():
    ts = np.linspace(0, 1, 11)
    # 0 -> 1 and 1 -> 0 cross at t = 1/2 (a grid time: separation exactly 0); 2 -> 3 crosses neither
    X = _lines([0.0, 1.0, 2.0], [1.0, 0.0, 3.0], ts)
    count, crossed = figures.count_crossings(X)
    assert count == 1 and crossed[0, 1] and crossed[1, 0] and not crossed[0, 2]
    # the same pair crossing between grid times
    assert figures.count_crossings(_lines([0.0, 1.0], [1.0, 0.1], np.linspace(0, 1, 4)))[0] == 1
    # parallel lines never cross
    assert figures.count_crossings(_lines([0.0, 1.0], [2.0, 3.0], ts))[0] == 0


def test_grid_count_of_straight_lines_equals_the_order_swaps():
    rng = np.random.default_rng(0)
    x_0, x_1 = rng.standard_normal(30), rng.standard_normal(30)
    X = _lines(x_0, x_1, np.linspace(0, 1, 51))
    assert figures.count_crossings(X)[0] == figures.line_crossings(x_0, x_1) > 0


def test_count_crossings_refuses_two_dimensional_trajectories():
    with pytest.raises(ValueError, match="1-D"):
        figures.count_crossings(np.zeros((5, 3, 2)))


def test_chord_deviation_of_a_parabola():
    ts = np.linspace(0, 1, 101)
    X = (ts**2)[:, None, None]                 # chord x = t; largest gap t - t^2 = 1/4 at t = 1/2
    assert figures.chord_deviation(X, ts)[0] == pytest.approx(0.25, abs=1e-15)
    assert figures.chord_deviation(_lines([0.3], [-2.0], ts), ts)[0] < 1e-15


def test_quantile_transport_is_the_gaussian_flow_for_one_gaussian():
    # q = N(m, s^2) on the OT path: psi_t(x_0) = t m + sqrt((1 - t)^2 + t^2 s^2) x_0
    m, s = 1.5, 0.4
    target = rf.single_gaussian([m], [[s**2]])
    path = rf.OTPath()
    x_0 = np.linspace(-2.5, 2.5, 7)[:, None]
    ts = np.linspace(0, 1, 5)
    exact = ts[:, None, None] * m + np.sqrt((1 - ts) ** 2 + ts**2 * s**2)[:, None, None] * x_0[None]
    np.testing.assert_allclose(figures.quantile_transport(target, path, x_0, ts), exact, rtol=1e-13, atol=1e-14)
    flow = figures.marginal_trajectories(target.marginal(path), x_0, ts)
    np.testing.assert_allclose(flow, exact, atol=1e-8)


def test_mixture_cdf_matches_numerical_integration():
    target, path = figures.figure2_target(), rf.OTPath()
    t, x = 0.7, np.array([-1.0, 0.2, 2.0])
    grid = np.linspace(-30, x.max(), 400_001)
    dens = np.exp(target.marginal(path).log_prob(grid[:, None], t))
    cum = np.concatenate([[0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))])
    np.testing.assert_allclose(figures.mixture_cdf(target, path, x, t), np.interp(x, grid, cum), atol=1e-8)


def test_accelerations_and_curvature():
    rng = np.random.default_rng(1)
    x_0, x_1 = rng.standard_normal((4, 1)), rng.standard_normal((4, 1))
    assert np.all(figures.pair_acceleration(rf.OTPath(), x_0, x_1, 0.3) == 0.0)       # eq 35
    assert np.abs(figures.pair_acceleration(rf.CosinePath(), x_0, x_1, 0.3)).max() > 0.1
    # one Gaussian N(m, s^2), OT: x_t = t m + S_t x_0 with S_t = sqrt((1-t)^2 + t^2 s^2), so x'' = S_t'' x_0
    m, s, t = 1.5, 0.4, 0.35
    marginal = rf.single_gaussian([m], [[s**2]]).marginal(rf.OTPath())
    S = np.sqrt((1 - t) ** 2 + t**2 * s**2)
    S2 = ((1 + s**2) * S**2 - (t * (1 + s**2) - 1) ** 2) / S**3          # d^2/dt^2 sqrt(quadratic)
    x_t = t * m + S * x_0
    np.testing.assert_allclose(figures.marginal_acceleration(marginal, x_t, t), S2 * x_0, rtol=1e-11)
    assert figures.curvature(np.array([[0.0]]), np.array([[2.0]]))[0] == 2.0


def test_figure2_draws_both_panels():
    fig = figures.figure2(np.random.default_rng(2), n=12)
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert any("conditional" in s for s in titles) and any("marginal flows: curved, 0 crossing" in s for s in titles)
    assert len(fig.axes[1].lines) == 12
