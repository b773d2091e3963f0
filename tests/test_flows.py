"""Tests of refflow.flows: discrete normalizing flows (eq 1-7)."""
import math

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads
from hypothesis import given, settings, strategies as st
from scipy.stats import multivariate_normal

from refflow.flows import (
    AffineCoupling, ElementwiseAffine, FixedPointError, Flow, LUAffine, Residual,
    alternating_mask, base_log_prob, fit, jacobian_autograd, logdet_autograd,
    mass_on_grid, mlp_apply, spectral_norm, tail_mass_bound,
)

EXACT = 1e-10  # float64 identities: rounding is ~1e-15, far below this


def rel_err(a, b):
    """max|a - b| / max(1, max|b|): relative for large values, absolute near 0."""
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def make_layer(kind, d):
    if kind == "elementwise":
        return ElementwiseAffine(d)
    if kind == "lu":
        return LUAffine(d, permutation=np.roll(np.arange(d), 1))
    if kind == "coupling":
        return AffineCoupling(d, alternating_mask(d, 0), hidden=(16, 16))
    if kind == "residual":
        return Residual(d, hidden=(16,), delta=0.5)
    raise AssertionError(kind)


def layer_params(layer, rng):
    # Residual weights drawn large enough that spectral normalisation binds
    # (the contraction factor is then kappa = 0.9, the hardest allowed case).
    scale = 4.0 if isinstance(layer, Residual) else 0.7
    params = layer.init_params(rng, scale=scale)
    if isinstance(layer, Residual):
        params = [3.0 * p for p in params]
    return params


def make_flow(d=2):
    return Flow([
        ElementwiseAffine(d),
        LUAffine(d),
        AffineCoupling(d, alternating_mask(d, 0), hidden=(16, 16)),
        Residual(d, hidden=(16,), delta=0.5),
        AffineCoupling(d, alternating_mask(d, 1), hidden=(16, 16)),
    ])


def flow_params(flow, rng):
    rng = np.random.default_rng(rng)
    return [layer_params(layer, rng) for layer in flow.layers]


class SignFlippedCoupling(AffineCoupling):
    """Negative control: the inverse log-det has the wrong sign."""

    def _inverse(self, params, y):
        x, logdet_inv = super()._inverse(params, y)
        return x, -logdet_inv


class DroppedLogdetCoupling(AffineCoupling):
    """Negative control: the log-det term is forgotten."""

    def _inverse(self, params, y):
        x, logdet_inv = super()._inverse(params, y)
        return x, 0.0 * logdet_inv


KINDS = ["elementwise", "lu", "coupling", "residual"]


# --------------------------------------------------------------------------
# base density
# --------------------------------------------------------------------------

def test_base_log_prob_matches_scipy():
    x = np.random.default_rng(0).standard_normal((7, 3))
    ref = multivariate_normal(np.zeros(3), np.eye(3)).logpdf(x)
    assert rel_err(base_log_prob(x), ref) < EXACT


# --------------------------------------------------------------------------
# each layer: inverse o forward = id, log-dets exact
# --------------------------------------------------------------------------

@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_round_trip(kind, d):
    rng = np.random.default_rng(1)
    layer = make_layer(kind, d)
    params = layer_params(layer, rng)
    x = 2.0 * rng.standard_normal((64, d))
    y, _ = layer.forward(params, x)
    x_back, _ = layer.inverse(params, y)
    assert np.max(np.abs(x_back - x)) < EXACT
    # and the other way round
    y_back, _ = layer.forward(params, layer.inverse(params, y)[0])
    assert np.max(np.abs(y_back - y)) < EXACT
    # the layer is not the identity (otherwise the round trip proves nothing)
    assert np.max(np.abs(y - x)) > 1e-2


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_logdet_matches_autograd(kind, d):
    """Analytic log|det J| (eq 2, 5) = slogdet of the autograd Jacobian."""
    rng = np.random.default_rng(2)
    layer = make_layer(kind, d)
    params = layer_params(layer, rng)
    x = 1.5 * rng.standard_normal((40, d))
    y, logdet = layer.forward(params, x)
    x_back, logdet_inv = layer.inverse(params, y)
    ref_fwd = logdet_autograd(lambda z: layer.forward(params, z)[0], x)
    ref_inv = logdet_autograd(lambda z: layer.inverse(params, z)[0], y)
    assert rel_err(logdet, ref_fwd) < EXACT
    assert rel_err(logdet_inv, ref_inv) < EXACT
    assert rel_err(logdet_inv, -logdet) < EXACT
    assert np.max(np.abs(logdet)) > 1e-2  # non-trivial volume change


def test_jacobian_autograd_against_finite_differences():
    rng = np.random.default_rng(3)
    layer = make_layer("coupling", 3)
    params = layer_params(layer, rng)
    x = rng.standard_normal((5, 3))
    J = jacobian_autograd(lambda z: layer.forward(params, z)[0], x)
    eps = 1e-6
    for k in range(3):
        e = np.zeros(3)
        e[k] = eps
        fd = (layer.forward(params, x + e)[0] - layer.forward(params, x - e)[0]) / (2 * eps)
        assert np.max(np.abs(J[:, :, k] - fd)) < 1e-8  # central FD error ~ eps^2 + rounding/eps


def test_lu_layer_is_the_stated_matrix():
    rng = np.random.default_rng(4)
    layer = LUAffine(3, permutation=[2, 0, 1])
    params = layer.init_params(rng, scale=0.8)
    W = layer.weight(params)
    L, U = layer.factors(params)
    assert np.allclose(np.diag(L), 1.0) and np.allclose(np.triu(L, 1), 0.0)
    assert np.allclose(np.tril(U, -1), 0.0)
    x = rng.standard_normal((6, 3))
    y, logdet = layer.forward(params, x)
    assert rel_err(y, x @ W.T + params[3]) < EXACT
    assert rel_err(logdet, np.full(6, np.log(abs(np.linalg.det(W))))) < EXACT


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 1.5))
def test_lu_and_coupling_round_trip_property(seed, scale):
    rng = np.random.default_rng(seed)
    for layer in (LUAffine(3), AffineCoupling(3, alternating_mask(3, 1), hidden=(8,))):
        params = layer.init_params(rng, scale=scale)
        x = rng.standard_normal((8, 3))
        y, logdet = layer.forward(params, x)
        x_back, logdet_inv = layer.inverse(params, y)
        # condition number of an LU layer is at most ~exp(2 * 4.5 sigma * scale)
        assert np.max(np.abs(x_back - x)) < 1e-9
        assert np.max(np.abs(logdet + logdet_inv)) < 1e-12 * (1 + np.max(np.abs(logdet)))


# --------------------------------------------------------------------------
# composition: log_prob by eq 2 / 5
# --------------------------------------------------------------------------

def test_composed_log_prob_equals_change_of_variables():
    flow = make_flow(2)
    params = flow_params(flow, 5)
    x_0 = np.random.default_rng(6).standard_normal((50, 2))
    x_1, _ = flow.forward(params, x_0)
    log_p = flow.log_prob(params, x_1)
    # (a) eq 2, first line, with the Jacobian of the whole psi by autograd
    ref_fwd = (multivariate_normal(np.zeros(2), np.eye(2)).logpdf(x_0)
               - logdet_autograd(lambda z: flow.forward(params, z)[0], x_0))
    # (b) eq 2, second line, with the Jacobian of the whole psi^-1 by autograd
    x_0_back = flow.inverse(params, x_1)[0]
    ref_inv = (multivariate_normal(np.zeros(2), np.eye(2)).logpdf(x_0_back)
               + logdet_autograd(lambda z: flow.inverse(params, z)[0], x_1))
    assert rel_err(log_p, ref_fwd) < EXACT
    assert rel_err(log_p, ref_inv) < EXACT
    # (c) the sampler's own log p (no inverse)
    x_s, log_p_s = flow.sample(params, 30, rng=7, return_log_prob=True)
    assert rel_err(flow.log_prob(params, x_s), log_p_s) < EXACT


def test_sample_is_reproducible_and_pushes_forward_the_base():
    flow = make_flow(2)
    params = flow_params(flow, 8)
    a = flow.sample(params, 20, rng=9)
    b = flow.sample(params, 20, rng=np.random.default_rng(9))
    assert np.array_equal(a, b)
    x_0 = np.random.default_rng(9).standard_normal((20, 2))
    assert np.array_equal(a, flow.forward(params, x_0)[0])


# --------------------------------------------------------------------------
# densities integrate to 1 (eq 2)
# --------------------------------------------------------------------------

R_GRID, H_GRID = 12.0, 0.1


def normalisation_error(flow, params):
    """(|mass - 1|, tolerance) for the density of a 2-D flow on [-12, 12]^2.

    Tolerance = tail mass bound (outside the box)
    + quadrature error estimate |M_h - M_2h| (trapezoid on a smooth,
      edge-negligible integrand converges faster than any power of h, so the
      coarser grid's error bounds the finer one's)
    + 1e-10 for the rest: rounding in the ~58 000-term sum (~1e-13) and the
      residual layer's fixed-point tolerance (|x error| <= kappa tol / (1 - kappa)
      ~ 1e-11 * max|y|, which moves log p by about |x_0| times that).
    """
    log_p = lambda z: flow.log_prob(params, z)
    m_h = mass_on_grid(log_p, R_GRID, H_GRID)
    m_2h = mass_on_grid(log_p, R_GRID, 2 * H_GRID)
    tail = tail_mass_bound(flow, params, R_GRID)
    return abs(m_h - 1.0), tail + abs(m_h - m_2h) + 1e-10


@pytest.mark.parametrize("kind", KINDS + ["composed"])
def test_density_integrates_to_one(kind):
    if kind == "composed":
        flow = make_flow(2)
        params = flow_params(flow, 10)
    else:
        flow = Flow([make_layer(kind, 2)])
        params = [layer_params(flow.layers[0], np.random.default_rng(10))]
    err, tol = normalisation_error(flow, params)
    assert tol < 1e-5  # the test is sharp: grid and box are adequate
    assert err <= tol, (err, tol)


@pytest.mark.parametrize("bad", [SignFlippedCoupling, DroppedLogdetCoupling])
def test_wrong_logdet_fails_normalisation(bad):
    """Negative control: a planted wrong log-det must break the integral."""
    flow = make_flow(2)
    params = flow_params(flow, 10)
    bad_flow = Flow(flow.layers[:4] + [bad(2, alternating_mask(2, 1), hidden=(16, 16))])
    err, tol = normalisation_error(bad_flow, params)
    assert err > 100 * tol, (err, tol)


# --------------------------------------------------------------------------
# residual layer (eq 6-7)
# --------------------------------------------------------------------------

def test_power_iteration_spectral_norm():
    rng = np.random.default_rng(11)
    for shape in [(16, 2), (2, 16), (7, 7), (1, 5)]:
        W = rng.standard_normal(shape)
        assert abs(spectral_norm(W) - np.linalg.norm(W, 2)) < 1e-10 * np.linalg.norm(W, 2)
        U, S, Vt = np.linalg.svd(W)
        g = grad(spectral_norm)(W)  # d sigma_max / dW = u v^T
        assert np.max(np.abs(g - np.outer(U[:, 0], Vt[0]))) < 1e-8


def test_residual_is_contractive():
    """delta * Lip(u) <= kappa: bound on weights and on random pairs of points."""
    rng = np.random.default_rng(12)
    layer = Residual(2, hidden=(16, 16), delta=0.5, kappa=0.8)
    params = [10.0 * p for p in layer.init_params(rng, scale=1.0)]
    assert layer.lipschitz_bound(params) <= 0.8 * (1 + 1e-10)
    a = rng.standard_normal((2000, 2))
    b = a + 0.1 * rng.standard_normal((2000, 2))
    du = layer.delta * (layer.u(params, a) - layer.u(params, b))
    ratio = np.linalg.norm(du, axis=1) / np.linalg.norm(a - b, axis=1)
    assert ratio.max() <= 0.8 * (1 + 1e-10)
    # without normalisation the same weights are far from contractive
    raw = Residual(2, hidden=(16, 16), delta=0.5, spectral_normalise=False)
    assert raw.lipschitz_bound(params) > 10


def _diagonal_tanh_params(d, a, b):
    """u(x) = b tanh(a x) coordinatewise: Lip(u) = a b, attained at x = 0."""
    return [a * np.eye(d), np.zeros(d), b * np.eye(d), np.zeros(d)]


def test_residual_inverse_converges_when_contractive():
    d = 2
    layer = Residual(d, hidden=(d,), delta=0.5)  # normalised: delta Lip(u) <= 0.9
    params = _diagonal_tanh_params(d, 2.0, 3.0)  # raw delta*a*b = 3
    y = np.random.default_rng(13).uniform(-3, 3, (200, d))
    x, _ = layer.inverse(params, y)
    assert np.max(np.abs(layer.forward(params, x)[0] - y)) < EXACT
    x0 = np.random.default_rng(14).standard_normal((200, d))
    assert np.max(np.abs(layer.inverse(params, layer.forward(params, x0)[0])[0] - x0)) < EXACT


def test_residual_inverse_fails_when_not_contractive():
    """Negative control: delta * Lip(u) = 3 > 1 and the iteration provably fails.

    u(x) = b tanh(a x) with delta a b = 3.  phi(x) = x + delta u(x) is still a
    bijection (phi' >= 1), so the failure is the iteration's: g(x) = y - delta u(x)
    is decreasing with |g'(x*)| = 3 sech^2(a x*) > 1 at the root x* of small y,
    a repelling fixed point; the iterates settle on a 2-cycle instead.
    """
    d = 2
    layer = Residual(d, hidden=(d,), delta=0.5, spectral_normalise=False, max_iter=300)
    params = _diagonal_tanh_params(d, 2.0, 3.0)
    y = np.random.default_rng(15).uniform(-0.1, 0.1, (20, d))
    with pytest.raises(FixedPointError, match=r"did not converge.*residual") as info:
        layer.inverse(params, y)
    assert info.value.residual > 1.0  # the 2-cycle's jump, not a near miss
    assert info.value.iterations == 300
    assert "delta * prod ||W_l|| = 3" in str(info.value)
    # phi is nevertheless invertible: bisection finds the root coordinatewise
    from scipy.optimize import brentq
    y0 = y[0, 0]
    root = brentq(lambda s: s + 0.5 * 3.0 * math.tanh(2.0 * s) - y0, -1, 1, xtol=1e-15)
    assert abs(layer.forward(params, np.array([[root, root]]))[0][0, 0] - y0) < 1e-12


def test_fixed_point_error_is_a_value_error():
    assert issubclass(FixedPointError, ValueError)


def test_fixed_point_vjp_matches_unrolled_autograd_and_finite_differences():
    """The implicit-function VJP of the inverse = autograd through the unrolled iteration."""
    rng = np.random.default_rng(16)
    layer = Residual(2, hidden=(8,), delta=1.0)
    params = [3.0 * p for p in layer.init_params(rng, scale=3.0)]  # normalisation binds
    y = rng.standard_normal((6, 2))
    w = rng.standard_normal((6, 2))

    def f_implicit(p, y):
        x, logdet_inv = layer.inverse(p, y)
        return anp.sum(w * x) + anp.sum(logdet_inv)

    def f_unrolled(p, y):
        ws = layer.normalised_params(p)
        x = y
        for _ in range(400):  # contraction <= 0.9: derivative error ~ 400 * 0.9^400 ~ 1e-16
            x = y - layer.delta * mlp_apply(ws, x)
        return anp.sum(w * x) - anp.sum(layer._logdet_at(ws, x))

    g_imp, g_unr = grad(f_implicit)(params, y), grad(f_unrolled)(params, y)
    for a, b in zip(g_imp, g_unr):
        assert rel_err(a, b) < 1e-9
    assert rel_err(grad(f_implicit, 1)(params, y), grad(f_unrolled, 1)(params, y)) < 1e-9
    check_grads(f_implicit, modes=["rev"], order=1)(params, y)


def test_flow_nll_gradient_with_residual_layers_finite_differences():
    flow = make_flow(2)
    params = flow_params(flow, 17)
    x = np.random.default_rng(18).standard_normal((8, 2))
    check_grads(lambda p: flow.nll(p, x), modes=["rev"], order=1)(params)


# --------------------------------------------------------------------------
# maximum-likelihood training (eq 3)
# --------------------------------------------------------------------------

def two_moons(n, rng, noise=0.05):
    rng = np.random.default_rng(rng)
    k = rng.integers(0, 2, n)
    theta = rng.uniform(0.0, np.pi, n)
    upper = np.column_stack([np.cos(theta), np.sin(theta)])
    lower = np.column_stack([1.0 - np.cos(theta), 0.5 - np.sin(theta)])
    x = np.where(k[:, None] == 0, upper, lower) + noise * rng.standard_normal((n, 2))
    return (x - [0.5, 0.25]) / [0.87, 0.5]  # roughly standardised


def gaussian_nll(train, test):
    """NLL on `test` of the maximum-likelihood Gaussian fitted to `train`."""
    mu, cov = train.mean(0), np.cov(train.T, bias=True)
    return -multivariate_normal(mu, cov).logpdf(test).mean()


def test_ml_training_beats_the_best_gaussian():
    train, test = two_moons(2000, 19), two_moons(2000, 20)
    flow = Flow([ElementwiseAffine(2)] + [
        AffineCoupling(2, alternating_mask(2, k % 2), hidden=(24, 24)) for k in range(4)
    ])
    params0 = flow.init_params(21, scale=0.01)
    params, history = fit(flow, params0, train, steps=200, lr=1e-2, batch_size=256, rng=22)
    nll0, nll = float(flow.nll(params0, test)), float(flow.nll(params, test))
    nll_gauss = gaussian_nll(train, test)  # the best any affine flow can do
    nll_std = -multivariate_normal(np.zeros(2), np.eye(2)).logpdf(test).mean()
    assert history.shape == (200,) and np.all(np.isfinite(history))
    assert nll < nll0 - 0.5, (nll0, nll)
    assert nll < nll_gauss - 0.5, (nll_gauss, nll)
    assert nll < nll_std
    assert history[-20:].mean() < history[:20].mean() - 0.5


def test_ml_training_with_residual_layers_decreases_nll():
    data = two_moons(500, 23)
    flow = Flow([ElementwiseAffine(2), Residual(2, hidden=(16,), delta=1.0), LUAffine(2),
                 Residual(2, hidden=(16,), delta=1.0)])
    params0 = flow.init_params(24, scale=0.1)
    params, history = fit(flow, params0, data, steps=25, lr=2e-2, batch_size=500, rng=25)
    assert float(flow.nll(params, data)) < float(flow.nll(params0, data)) - 0.05
    assert history[-1] < history[0]


def test_fit_is_reproducible_and_leaves_input_untouched():
    data = two_moons(300, 26)
    flow = Flow([ElementwiseAffine(2), AffineCoupling(2, alternating_mask(2, 0), hidden=(8,))])
    params0 = flow.init_params(27)
    copy0 = [[p.copy() for p in layer] for layer in params0]
    p_a, h_a = fit(flow, params0, data, steps=5, batch_size=64, rng=28)
    p_b, h_b = fit(flow, params0, data, steps=5, batch_size=64, rng=np.random.default_rng(28))
    assert np.array_equal(h_a, h_b)
    for la, lb, l0, lc in zip(p_a, p_b, params0, copy0):
        for a, b, p0, c in zip(la, lb, l0, lc):
            assert np.array_equal(a, b) and np.array_equal(p0, c)


# --------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------

def test_validation_messages():
    flow = make_flow(2)
    params = flow_params(flow, 29)
    with pytest.raises(ValueError, match="x_1.*2 columns"):
        flow.log_prob(params, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="x_1.*finite"):
        flow.log_prob(params, np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="params: expected a list of 5"):
        flow.log_prob(params[:4], np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"params\[0\]: expected shape \(2,\)"):
        flow.layers[0].forward([np.zeros(3), np.zeros(2)], np.zeros((1, 2)))
    with pytest.raises(TypeError, match="rng"):
        flow.sample(params, 3, rng=None)
    with pytest.raises(ValueError, match="n: expected"):
        flow.sample(params, 0, rng=0)
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling(2, [1, 1])
    with pytest.raises(ValueError, match="kappa"):
        Residual(2, kappa=1.0)
    with pytest.raises(ValueError, match="delta"):
        Residual(2, delta=0.0)
    with pytest.raises(ValueError, match="permutation"):
        LUAffine(3, permutation=[0, 0, 1])
    with pytest.raises(ValueError, match="one dimension"):
        Flow([ElementwiseAffine(2), ElementwiseAffine(3)])
    with pytest.raises(TypeError, match="layers"):
        Flow([])
    with pytest.raises(ValueError, match="lr"):
        fit(flow, params, np.zeros((4, 2)), steps=1, lr=0.0)
    with pytest.raises(ValueError, match="data.*2 columns"):
        fit(flow, params, np.zeros((4, 3)), steps=1)


def test_second_order_through_fixed_point_inverse_is_refused():
    layer = Residual(2, hidden=(8,), delta=1.0)
    params = layer.init_params(30, scale=1.0)
    y = np.random.default_rng(31).standard_normal((4, 2))
    nested = lambda p: anp.sum(logdet_autograd(lambda z: layer.inverse(p, z)[0], y))
    with pytest.raises(NotImplementedError, match="second-order"):
        grad(nested)(params)


# --------------------------------------------------------------------------
# the registered verification checks
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flows.logdet", "flows.residual_inverse", "flows.fixed_point_vjp"])
def test_registered_quick_checks_pass(name):
    from refflow.verify.registry import registered, run_check

    (entry,) = [e for e in registered() if e.name == name]
    assert entry.quick
    result = run_check(entry, quick=True)
    assert result.passed, result.message
    assert result.control_caught
