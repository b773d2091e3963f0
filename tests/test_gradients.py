"""Tests of refflow.gradients and of the CFM/FM gradient checks (eq 19-24)."""
import numpy as np
import pytest
from autograd import grad
from scipy import integrate

import refflow as rf
from refflow.gradients import (
    LinearFeatureModel,
    exact_cfm_gradient,
    fit_output_layer,
    gradient_difference_samples,
    loss_difference_samples,
    loss_gradient,
    per_sample_vjp,
    posterior_mean_x1,
    posterior_velocity,
)
from refflow.losses import cfm_loss, fm_loss
from refflow.nn import MLP
from refflow.verify.checks import gradients as checks
from refflow.verify.checks.paths import all_paths
from refflow.verify.registry import registered, run_check


@pytest.mark.parametrize("name", ["gradients.cfm_fm_monte_carlo", "gradients.cfm_fm_exact",
                                  "gradients.cfm_minus_fm_theta_free", "gradients.mc_rate"])
def test_registered_check_passes_and_catches_its_control(name):
    (entry,) = [e for e in registered() if e.name == name]
    result = run_check(entry, quick=True)
    assert result.error <= result.tolerance, result
    assert result.control_error > result.tolerance, "negative control slipped through"
    assert result.passed


def _rows_by_autograd(model, params, t, x, g, y=None):
    # The reference: one autograd gradient per row.
    out = []
    for i in range(x.shape[0]):
        yi = None if y is None else y[i:i + 1]
        out.append(grad(lambda p: np.sum(model.apply(p, t[i:i + 1], x[i:i + 1], yi) * g[i:i + 1]))(params))
    return np.array(out)


@pytest.mark.parametrize("kwargs", [dict(), dict(activation="tanh", fourier_features=2),
                                    dict(n_classes=3, embed_dim=4)], ids=["silu", "tanh+fourier", "classes"])
def test_mlp_per_sample_rows_match_autograd_row_by_row(kwargs):
    rng = np.random.default_rng(0)
    model = MLP(2, (8, 8), **kwargs)
    params = model.init_params(1)
    n = 12
    x, t, g = rng.standard_normal((n, 2)), rng.random(n), rng.standard_normal((n, 2))
    y = rng.integers(-1, 3, n) if "n_classes" in kwargs else None
    rows = per_sample_vjp(model, params, t, x, g, y)
    np.testing.assert_allclose(rows, _rows_by_autograd(model, params, t, x, g, y), rtol=1e-12, atol=1e-14)
    # and they add up to the model's own (summed) VJP
    _, vjp = model.value_and_vjp(params, t, x, y)
    np.testing.assert_allclose(rows.sum(axis=0), vjp(g)[0], rtol=1e-12, atol=1e-14)


def test_linear_model_rows_are_outer_products_and_match_autograd():
    rng = np.random.default_rng(1)
    model = LinearFeatureModel(3, 5, rng)
    params = model.init_params(rng)
    x, t, g = rng.standard_normal((7, 3)), rng.random(7), rng.standard_normal((7, 3))
    rows = per_sample_vjp(model, params, t, x, g)
    np.testing.assert_allclose(rows, _rows_by_autograd(model, params, t, x, g), rtol=1e-13, atol=1e-15)
    phi = model.features(t, x)
    np.testing.assert_allclose(rows.reshape(7, 3, -1), g[:, :, None] * phi[:, None, :], rtol=0, atol=0)


def test_linear_model_rejects_bad_input():
    model = LinearFeatureModel(2, 4, 0)
    with pytest.raises(ValueError, match="y"):
        model.apply(model.init_params(0), 0.5, np.zeros((3, 2)), y=np.zeros(3, int))
    with pytest.raises(ValueError, match="params"):
        model.apply(np.zeros(5), 0.5, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="g"):
        model.per_sample_vjp(model.init_params(0), 0.5, np.zeros((3, 2)), np.zeros((2, 2)))


def _draws(target, n, rng, t_max=1.0):
    x_1 = target.sample(n, rng)
    return rng.standard_normal(x_1.shape), x_1, rng.uniform(0.0, t_max, n)


@pytest.mark.parametrize("model", [MLP(2, (8,)), LinearFeatureModel(2, 6, 3)], ids=["mlp", "linear"])
def test_gradient_difference_rows_average_to_the_loss_gradients(model):
    # eq 20 and 15 on one batch: mean of the rows = grad cfm_loss - grad fm_loss (same x_t)
    rng = np.random.default_rng(2)
    target = rf.random_mixture(2, 3, rng)
    path = rf.VPPath()
    marginal = target.marginal(path)
    params = np.asarray(model.init_params(rng))
    x_0, x_1, t = _draws(target, 50, rng, 0.9)
    D = gradient_difference_samples(model, params, marginal, x_0, x_1, t)
    x_t = path.sample(x_0, x_1, t)
    g_cfm = grad(lambda p: cfm_loss(model, p, path, x_0, x_1, t))(params)
    g_fm = grad(lambda p: fm_loss(model, p, marginal, x_t, t))(params)
    np.testing.assert_allclose(D.mean(axis=0), g_cfm - g_fm, rtol=1e-10, atol=1e-13)
    e = loss_difference_samples(model, params, marginal, x_0, x_1, t)
    assert e.mean() == pytest.approx(cfm_loss(model, params, path, x_0, x_1, t) - fm_loss(model, params, marginal, x_t, t),
                                     rel=1e-12)


def test_posterior_mean_by_quadrature_in_one_dimension():
    # E[x_1 | x_t = x] = int x_1 q(x_1) N(x | a x_1, s^2) dx_1 / int q(x_1) N(x | a x_1, s^2) dx_1
    target = rf.GaussianMixture([0.3, 0.7], [[-1.0], [2.0]], [0.25, 0.5])
    path = rf.OTPath()
    x, t = np.array([[-0.4], [0.3], [1.7]]), 0.6
    a, s = path.alpha(t), path.sigma(t)

    def joint(x1, xi, power):
        q = np.exp(target.log_prob(np.array([[x1]])))[0]
        return x1**power * q * np.exp(-0.5 * (xi - a * x1) ** 2 / s**2)

    expected = [integrate.quad(joint, -12, 12, args=(xi, 1), epsabs=0, epsrel=1e-13, limit=200)[0]
                / integrate.quad(joint, -12, 12, args=(xi, 0), epsabs=0, epsrel=1e-13, limit=200)[0]
                for xi in x[:, 0]]
    np.testing.assert_allclose(posterior_mean_x1(target, path, x, t)[:, 0], expected, rtol=1e-10)


def test_posterior_mean_of_a_point_set_is_the_weighted_average():
    rng = np.random.default_rng(3)
    points = rng.standard_normal((5, 2))
    target = rf.Empirical(points)
    path = rf.VPPath()
    x, t = rng.standard_normal((4, 2)), 0.7
    logw = -0.5 * np.sum((x[:, None] - path.alpha(t) * points[None]) ** 2, axis=2) / path.sigma(t) ** 2
    w = np.exp(logw - logw.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(posterior_mean_x1(target, path, x, t), w @ points, rtol=1e-13)


@pytest.mark.parametrize("path", all_paths(), ids=repr)
def test_posterior_average_of_the_conditional_field_is_eq19(path):
    rng = np.random.default_rng(4)
    target = rf.random_mixture(3, 3, rng)
    marginal = target.marginal(path)
    t = np.concatenate([[0.0], rng.uniform(0.0, 0.95, 15)])
    x = marginal.sample(16, t, rng)
    np.testing.assert_allclose(posterior_velocity(target, path, x, t), marginal.velocity(x, t),
                               rtol=1e-11, atol=1e-12 * np.abs(marginal.velocity(x, t)).max())


def test_exact_cfm_gradient_equals_fm_gradient_and_catches_a_dropped_term():
    rng = np.random.default_rng(5)
    target = rf.random_mixture(2, 3, rng)
    path = rf.VPPath()
    marginal = target.marginal(path)
    model = MLP(2, (8, 8))
    params = model.init_params(rng)
    t = rng.uniform(0.0, 0.95, 32)
    x = marginal.sample(32, t, rng)
    g_fm = grad(lambda p: fm_loss(model, p, marginal, x, t))(params)
    np.testing.assert_allclose(exact_cfm_gradient(model, params, target, path, x, t), g_fm, rtol=1e-10, atol=1e-14)
    wrong = path.d_alpha(t)[:, None] * posterior_mean_x1(target, path, x, t)
    assert np.abs(loss_gradient(model, params, x, t, wrong) - g_fm).max() > 1e-3 * np.abs(g_fm).max()


@pytest.mark.parametrize("model", [MLP(2, (8, 8)), LinearFeatureModel(2, 6, 3)], ids=["mlp", "linear"])
def test_fit_output_layer_zeroes_the_gradient_of_its_parameters(model):
    rng = np.random.default_rng(6)
    x, t = rng.standard_normal((200, 2)), rng.random(200)
    v = np.sin(x) + t[:, None]
    params = np.asarray(model.init_params(rng))
    fitted = fit_output_layer(model, params, t, x, v)
    g = loss_gradient(model, fitted, x, t, v)
    if isinstance(model, MLP):
        o = model.layout()[-2][1]            # W_out and b_out are the last blocks
        np.testing.assert_allclose(fitted[:o], params[:o], rtol=0, atol=0)
        assert np.abs(g[o:]).max() < 1e-10
    else:
        assert np.abs(g).max() < 1e-10


def test_column_z_handles_constant_columns():
    s = np.zeros((10, 3))
    s[:, 1] = 2.0
    s[:, 2] = np.arange(10.0)
    z = checks.column_z(s)
    assert z[0] == 0.0 and np.isinf(z[1])
    assert z[2] == pytest.approx(4.5 / (np.std(np.arange(10.0), ddof=1) / np.sqrt(10)))


def test_dropped_sigma_term_control_is_what_it_claims():
    rng = np.random.default_rng(7)
    x_0, x_1, t = rng.standard_normal((5, 2)), rng.standard_normal((5, 2)), rng.uniform(0.1, 0.9, 5)
    vp = rf.VPPath()
    np.testing.assert_allclose(checks.DroppedSigmaTerm().target(x_0, x_1, t),
                               vp.target(x_0, x_1, t) - vp.d_sigma(t)[:, None] * x_0, rtol=1e-14)


def test_rate_slope_recovers_an_exact_power_law():
    sizes = np.array([16, 32, 64, 128])
    slope, sd = checks.slope_with_error(sizes, 3.0 * sizes**-0.5, np.full(4, 0.01))
    assert slope == pytest.approx(-0.5, abs=1e-12)
    assert sd > 0
