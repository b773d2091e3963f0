"""Tests of refflow.targets: closed-form marginal paths and fields (eq 16, 19)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal

import refflow as rf
from refflow.verify.checks import paths as path_checks
from refflow.verify.registry import registered, run_check

PATHS = path_checks.all_paths()


@pytest.mark.parametrize(
    "name", ["targets.marginal_monte_carlo", "targets.continuity", "targets.score_divergence", "targets.sampling"]
)
def test_registered_check_passes_and_catches_its_control(name):
    (entry,) = [e for e in registered() if e.name == name]
    result = run_check(entry, quick=True)
    assert result.error <= result.tolerance, result
    assert result.control_error > result.tolerance, "negative control slipped through"
    assert result.passed


def _scipy_marginal_logpdf(gmm, path, x, t):
    a, s = path.alpha(t), path.sigma(t)
    dens = sum(
        w * multivariate_normal(a * m, a**2 * C + s**2 * np.eye(gmm.dim)).pdf(x)
        for w, m, C in zip(gmm.weights, gmm.means, gmm.covariances)
    )
    return np.log(dens)


@pytest.mark.parametrize("path", PATHS, ids=repr)
def test_marginal_log_prob_matches_scipy(path):
    # eq 16 for a mixture: p_t = sum_k w_k N(alpha m_k, alpha^2 C_k + sigma^2 I), built by scipy.
    gmm = rf.random_mixture(3, 3, np.random.default_rng(4), mean_scale=1.0)
    x = np.random.default_rng(5).standard_normal((6, 3))
    for t in (0.0, 0.37, 1.0):
        np.testing.assert_allclose(gmm.marginal(path).log_prob(x, t), _scipy_marginal_logpdf(gmm, path, x, t), rtol=1e-12)


def test_single_gaussian_ot_field_by_hand():
    # One Gaussian N(m, c I) under OT, sigma_min = 0: u_t(x) = m + (t c - (1 - t))/(t^2 c + (1 - t)^2) (x - t m).
    m, c = np.array([1.0, -2.0]), 0.5
    gmm = rf.single_gaussian(m, c * np.eye(2))
    x = np.random.default_rng(6).standard_normal((4, 2))
    for t in (0.0, 0.3, 1.0):
        expected = m + (t * c - (1 - t)) / (t**2 * c + (1 - t) ** 2) * (x - t * m)
        np.testing.assert_allclose(gmm.marginal(rf.OTPath()).velocity(x, t), expected, rtol=1e-13)


def test_velocity_matches_eq19_by_quadrature_over_an_empirical_target():
    # eq 19 for a point set is a finite sum: compute it directly with the conditional field (eq 31).
    rng = np.random.default_rng(7)
    pts = rng.standard_normal((5, 2))
    path = rf.VPPath()
    x = rng.standard_normal((3, 2))
    t = 0.6
    w = np.array([[np.exp(path.conditional_log_prob(x[i:i + 1], pts[j:j + 1], t))[0] for j in range(5)] for i in range(3)])
    u_cond = np.array([[path.conditional_velocity(x[i:i + 1], pts[j:j + 1], t)[0] for j in range(5)] for i in range(3)])
    expected = np.einsum("ij,ijd->id", w / w.sum(1, keepdims=True), u_cond)
    np.testing.assert_allclose(rf.Empirical(pts).marginal(path).velocity(x, t), expected, rtol=1e-12)


def test_empirical_singular_at_t1():
    emp = rf.Empirical(np.zeros((3, 2)) + np.arange(3)[:, None])
    with pytest.raises(ValueError, match="sigma_t = 0"):
        emp.marginal(rf.OTPath()).velocity(np.zeros((1, 2)), 1.0)
    # sigma_min > 0 makes it regular
    assert np.all(np.isfinite(emp.marginal(rf.OTPath(0.01)).velocity(np.zeros((1, 2)), 1.0)))


def test_per_point_times_equal_scalar_times():
    gmm = rf.random_mixture(4, 3, 8)
    m = gmm.marginal(rf.CosinePath())
    x = np.random.default_rng(9).standard_normal((5, 4))
    t = np.array([0.0, 0.2, 0.5, 0.9, 1.0])
    per_point = m.evaluate(x, t)
    for i, ti in enumerate(t):
        one = m.evaluate(x[i:i + 1], float(ti))
        for key in per_point:
            np.testing.assert_allclose(per_point[key][i], one[key][0], rtol=1e-13, atol=1e-14)


def test_blocked_evaluation_equals_unblocked(monkeypatch):
    import refflow.targets as targets

    gmm = rf.random_mixture(3, 5, 10)
    m = gmm.marginal(rf.OTPath(0.01))
    x = np.random.default_rng(11).standard_normal((100, 3))
    t = np.linspace(0, 1, 100)
    whole = m.evaluate(x, t)
    monkeypatch.setattr(targets, "_BLOCK", 15 * 7)  # forces blocks of 7 rows
    blocked = m.evaluate(x, t)
    for key in whole:
        np.testing.assert_array_equal(whole[key], blocked[key])


def test_class_conditioning():
    gmm = rf.eight_gaussians()
    one = gmm.condition(3)
    assert one.n_components == 1
    np.testing.assert_allclose(one.means[0], gmm.means[3])
    x, y, k = gmm.sample_with_labels(100, 0)
    np.testing.assert_array_equal(y, k)
    with pytest.raises(ValueError, match="label"):
        gmm.condition(8)
    with pytest.raises(ValueError, match="no class labels"):
        rf.random_mixture(2, 2, 0).condition(0)


def test_presets_are_valid_mixtures():
    for name in rf.targets.TARGETS:
        gmm = rf.make_target(name)
        assert gmm.dim == 2
        assert abs(gmm.weights.sum() - 1) < 1e-12
        x = gmm.sample(1000, 0)
        assert np.all(np.isfinite(gmm.log_prob(x)))
        assert gmm.n_classes >= 2


def test_sampling_is_reproducible():
    gmm = rf.two_moons()
    np.testing.assert_array_equal(gmm.sample(50, 123), gmm.sample(50, 123))
    np.testing.assert_array_equal(gmm.sample(50, np.random.default_rng(5)), gmm.sample(50, np.random.default_rng(5)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weights=[0.5, 0.6], means=np.zeros((2, 2)), covariances=[1.0, 1.0]), "summing to 1"),
        (dict(weights=[1.5, -0.5], means=np.zeros((2, 2)), covariances=[1.0, 1.0]), "non-negative"),
        (dict(weights=[1.0], means=np.zeros((2, 2)), covariances=[1.0, 1.0]), "weights: expected shape"),
        (dict(weights=[], means=np.zeros((0, 2)), covariances=[]), "at least one component"),
        (dict(weights=[1.0], means=np.zeros((1, 2)), covariances=[[[1.0, 2.0], [2.0, 1.0]]]), "positive-definite"),
        (dict(weights=[1.0], means=np.zeros((1, 2)), covariances=[[[1.0, 0.5], [0.0, 1.0]]]), "symmetric"),
        (dict(weights=[1.0], means=np.zeros((1, 2)), covariances=[-1.0]), "positive isotropic"),
        (dict(weights=[1.0], means=np.zeros((1, 2)), covariances=np.ones((1, 3))), "covariances: expected shape"),
        (dict(weights=[1.0], means=np.zeros(2), covariances=[1.0]), "means: expected a 2-D array"),
    ],
)
def test_bad_mixtures(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rf.GaussianMixture(**kwargs)


def test_bad_evaluation_input():
    m = rf.eight_gaussians().marginal(rf.OTPath())
    with pytest.raises(ValueError, match="x: expected 2 columns"):
        m.velocity(np.zeros((3, 3)), 0.5)
    with pytest.raises(ValueError, match="t: expected values in"):
        m.velocity(np.zeros((3, 2)), -0.1)
    with pytest.raises(ValueError, match="t: expected shape"):
        m.velocity(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(TypeError, match="path"):
        rf.eight_gaussians().marginal("ot")
    with pytest.raises(TypeError, match="rng"):
        rf.eight_gaussians().sample(3, None)


@settings(max_examples=40, deadline=None)
@given(
    index=st.integers(0, len(PATHS) - 1),
    d=st.integers(1, 64),
    K=st.integers(1, 4),
    t=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
    far=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_finite_output_for_valid_input(index, d, K, t, far, seed):
    gmm = rf.random_mixture(d, K, seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((3, d))
    if far:
        x *= 1e3 / np.linalg.norm(x, axis=1, keepdims=True)
    out = gmm.marginal(PATHS[index]).evaluate(x, t)
    for key, value in out.items():
        assert np.all(np.isfinite(value)), key


def test_monte_carlo_estimator_validates():
    with pytest.raises(ValueError, match="sigma_t > 0"):
        rf.monte_carlo_velocity(rf.OTPath(), np.zeros((3, 2)), np.zeros((1, 2)), 1.0)
