"""Tests of refflow.paths (eq 17-18, 25-37)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refflow as rf
from refflow.verify.checks import paths as path_checks

ALL = path_checks.all_paths()


@pytest.mark.parametrize("name", ["paths.derivatives", "paths.boundary", "paths.conditional_velocity"])
def test_registered_check_passes_and_catches_its_control(name):
    from refflow.verify.registry import registered, run_check

    (entry,) = [e for e in registered() if e.name == name]
    result = run_check(entry)
    assert result.error <= result.tolerance, result
    assert result.control_error > result.tolerance, "negative control slipped through"
    assert result.passed


def test_ot_formulas_by_hand():
    # eq 34-35 written out independently of the class.
    path = rf.OTPath(sigma_min=0.1)
    rng = np.random.default_rng(1)
    x_0, x_1 = rng.standard_normal((2, 7, 3))
    t = rng.uniform(size=7)
    expected_xt = (1 - 0.9 * t)[:, None] * x_0 + t[:, None] * x_1
    np.testing.assert_allclose(path.sample(x_0, x_1, t), expected_xt, rtol=1e-14)
    np.testing.assert_allclose(path.target(x_0, x_1, t), x_1 - 0.9 * x_0, rtol=1e-14)


def test_eq37_target_is_x1_minus_x0():
    path = rf.OTPath()
    rng = np.random.default_rng(2)
    x_0, x_1 = rng.standard_normal((2, 5, 2))
    np.testing.assert_array_equal(path.target(x_0, x_1, 0.3), x_1 - x_0)


def test_vp_schedule_by_hand():
    path = rf.VPPath(beta_min=0.1, beta_max=20.0)
    t = np.array([0.0, 0.25, 0.9])
    r = 1 - t
    T = 0.1 * r + 0.5 * 19.9 * r**2
    np.testing.assert_allclose(path.alpha(t), np.exp(-T / 2), rtol=1e-14)
    np.testing.assert_allclose(path.sigma(t), np.sqrt(1 - np.exp(-T)), rtol=1e-13)
    assert path.alpha(1.0) == 1.0 and path.sigma(1.0) == 0.0


def test_ve_schedule_by_hand():
    path = rf.VEPath(sigma_min=0.02, sigma_max=8.0)
    t = np.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(path.sigma(t), 0.02 * (8.0 / 0.02) ** (1 - t), rtol=1e-14)
    np.testing.assert_array_equal(path.alpha(t), 1.0)


def test_conditional_log_prob_matches_scipy():
    from scipy.stats import multivariate_normal

    path = rf.CosinePath()
    rng = np.random.default_rng(3)
    x, x_1 = rng.standard_normal((2, 4, 3))
    t = 0.4
    a, s = path.alpha(t), path.sigma(t)
    expected = [multivariate_normal(a * x_1[i], s**2 * np.eye(3)).logpdf(x[i]) for i in range(4)]
    np.testing.assert_allclose(path.conditional_log_prob(x, x_1, t), expected, rtol=1e-13)


def test_singular_points_raise_clearly():
    x = np.zeros((2, 2))
    with pytest.raises(ValueError, match="sigma_t = 0"):
        rf.OTPath().conditional_velocity(x, x, 1.0)
    with pytest.raises(ValueError, match="t = 1"):
        rf.VPPath().d_sigma(1.0)
    with pytest.raises(ValueError, match="t = 1"):
        rf.VPPath().pair_velocity(x, x, np.array([0.5, 1.0]))
    # but the finite combination is fine at t = 1
    assert np.isfinite(rf.VPPath().sigma_d_sigma(1.0))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rf.OTPath(sigma_min=-0.1), "sigma_min"),
        (lambda: rf.OTPath(sigma_min=1.0), "sigma_min"),
        (lambda: rf.OTPath(sigma_min="a"), "sigma_min"),
        (lambda: rf.VEPath(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
        (lambda: rf.OTPath().alpha(1.5), "t: expected values in \\[0, 1\\]"),
        (lambda: rf.OTPath().alpha(np.nan), "t: expected finite"),
        (lambda: rf.OTPath().sample(np.zeros(3), np.zeros(3), 0.5), "x_0: expected a 2-D array"),
        (lambda: rf.OTPath().sample(np.zeros((3, 2)), np.zeros((3, 4)), 0.5), "x_1: expected 2 columns"),
        (lambda: rf.OTPath().sample(np.zeros((3, 2)), np.zeros((4, 2)), 0.5), "x_1: expected 3 rows"),
        (lambda: rf.OTPath().sample(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros(4)), "t: expected shape \\(3,\\)"),
        (lambda: rf.OTPath().sample(np.full((3, 2), np.inf), np.zeros((3, 2)), 0.5), "x_0: expected finite"),
        (lambda: rf.make_path("nope"), "name"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_make_path_round_trip():
    for path in ALL:
        rebuilt = rf.make_path(path.config())
        t = np.linspace(0, 1, 11)
        np.testing.assert_array_equal(rebuilt.alpha(t), path.alpha(t))
        np.testing.assert_array_equal(rebuilt.sigma(t), path.sigma(t))


def test_custom_path_derivatives_by_autograd():
    import autograd.numpy as anp

    path = rf.CustomPath(lambda t: t**2, lambda t: 1 - t**2)
    t = np.array([0.0, 0.3, 1.0])
    np.testing.assert_allclose(path.d_alpha(t), 2 * t, rtol=1e-15)
    np.testing.assert_allclose(path.d_sigma(t), -2 * t, rtol=1e-15)
    with pytest.raises(ValueError, match="sigma"):
        rf.CustomPath(lambda t: t, lambda t: t - 0.5)
    with pytest.raises(TypeError, match="alpha"):
        rf.CustomPath(3.0, anp.cos)


@settings(max_examples=60, deadline=None)
@given(
    index=st.integers(0, len(ALL) - 1),
    d=st.integers(1, 64),
    n=st.integers(1, 5),
    t=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
    scale=st.sampled_from([1.0, 1e3]),
    seed=st.integers(0, 2**31),
)
def test_finite_output_for_valid_input(index, d, n, t, scale, seed):
    path = ALL[index]
    rng = np.random.default_rng(seed)
    x_0, x_1 = scale * rng.standard_normal((2, n, d))
    assert np.all(np.isfinite(path.sample(x_0, x_1, t)))
    assert np.all(np.isfinite(path.sigma_d_sigma(t)))
    if path.sigma(t) > 0:
        assert np.all(np.isfinite(path.conditional_velocity(x_0, x_1, t)))
        assert np.all(np.isfinite(path.conditional_log_prob(x_0, x_1, t)))
    if t < 1.0 or not isinstance(path, (rf.VPPath, rf.LinearVPPath)):
        assert np.all(np.isfinite(path.target(x_0, x_1, t)))
