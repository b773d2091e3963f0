"""Tests of refflow.nn: the MLP u_theta(t, x[, y]) (eq 15, 20, 38, 40) and its kernels.

Ground truth is :mod:`refflow.nn.reference` (the same network in plain
autograd.numpy, written from the documented layout) and central finite
differences.  Exact comparisons use a relative tolerance of 1e-12 (float64).
"""
import json
import pickle

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

from refflow.nn import ACTIVATIONS, MLP
from refflow.nn import _kernels as K
from refflow.nn import reference as R

EXACT = 1e-12


def rel_err(a, b):
    """max |a - b| / max |b| (0 when both vanish)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b), initial=0.0)
    diff = np.max(np.abs(a - b), initial=0.0)
    if scale == 0.0:
        return diff
    return diff / scale


# (activation, n_classes, fourier_features)
CONFIGS = [(a, nc, F) for a in ACTIVATIONS for (nc, F) in [(None, 0), (3, 2)]]
CONFIGS += [("silu", None, 3), ("tanh", 4, 0)]


def make_case(act, nc, F, n=9, hidden=(12, 10, 8), dim=2, seed=0, dtype=np.float64):
    model = MLP(dim, hidden, act, n_classes=nc, embed_dim=3, fourier_features=F, dtype=dtype)
    rng = np.random.default_rng(seed)
    params = model.init_params(rng)
    x = rng.standard_normal((n, dim))
    t = rng.uniform(size=n)
    y = None if nc is None else rng.integers(-1, nc, size=n)
    return model, params, t, x, y, rng


# ------------------------------------------------------------------ kernel vs autograd reference

@pytest.mark.parametrize("act,nc,F", CONFIGS)
def test_apply_and_vjp_match_autograd_reference(act, nc, F):
    model, params, t, x, y, rng = make_case(act, nc, F)
    u = model.apply(params, t, x, y)
    assert rel_err(u, R.apply(model, params, t, x, y)) < EXACT

    g = rng.standard_normal(u.shape)
    grads = autograd.grad(lambda p, xx: anp.sum(g * model.apply(p, t, xx, y)), (0, 1))(params, x)
    ref = autograd.grad(lambda p, xx: anp.sum(g * R.apply(model, p, t, xx, y)), (0, 1))(params, x)
    assert rel_err(grads[0], ref[0]) < EXACT
    assert rel_err(grads[1], ref[1]) < EXACT
    if nc:  # the embedding rows of classes that occur get a gradient, the others none
        emb = model.unflatten(grads[0]).embedding
        seen = np.unique(np.where(y < 0, nc, y))
        assert np.all(np.any(emb[seen] != 0, axis=1))
        assert np.all(emb[np.setdiff1d(np.arange(nc + 1), seen)] == 0)

    # the no-autograd fast path gives the same numbers
    u2, vjp = model.value_and_vjp(params, t, x, y)
    gp, gx = vjp(g)
    assert np.array_equal(u2, u)
    assert rel_err(gp, ref[0]) < EXACT and rel_err(gx, ref[1]) < EXACT
    assert vjp(g, wrt_params=False)[0] is None
    assert rel_err(vjp(g, wrt_params=False)[1], ref[1]) < EXACT
    assert rel_err(vjp(g, wrt_x=False)[0], ref[0]) < EXACT


@pytest.mark.parametrize("act,nc,F", CONFIGS)
def test_divergence_is_the_trace_of_the_autograd_jacobian(act, nc, F):
    model, params, t, x, y, _ = make_case(act, nc, F)
    trace = np.trace(R.jacobian(model, params, t, x, y), axis1=1, axis2=2)
    div = model.divergence(params, t, x, y)
    assert div.shape == (x.shape[0],)
    assert rel_err(div, trace) < EXACT
    u, div2 = model.field_and_divergence(params, t, x, y)
    assert rel_err(div2, trace) < EXACT
    assert rel_err(u, R.apply(model, params, t, x, y)) < EXACT


@pytest.mark.parametrize("act,nc,F", CONFIGS)
def test_divergence_vjp_matches_second_order_autograd(act, nc, F):
    model, params, t, x, y, rng = make_case(act, nc, F, n=6, hidden=(10, 8))
    c = rng.standard_normal(x.shape[0])
    got = autograd.grad(lambda p, xx: anp.sum(c * model.divergence(p, t, xx, y)), (0, 1))(params, x)
    ref = autograd.grad(lambda p, xx: anp.sum(c * R.divergence(model, p, t, xx, y)), (0, 1))(params, x)
    assert rel_err(got[0], ref[0]) < EXACT
    if act == "relu":  # piecewise linear: the divergence is locally constant in x
        assert np.all(got[1] == 0) and np.all(ref[1] == 0)
    else:
        assert rel_err(got[1], ref[1]) < EXACT


@pytest.mark.parametrize("dim,hidden", [(1, (6,)), (3, (5, 7)), (4, (6,))])
def test_other_dimensions_and_depths(dim, hidden):
    # the stacked tangent pass for d != 2 and for a single hidden layer
    model, params, t, x, y, rng = make_case("tanh", 2, 1, n=5, hidden=hidden, dim=dim)
    assert rel_err(model.apply(params, t, x, y), R.apply(model, params, t, x, y)) < EXACT
    trace = np.trace(R.jacobian(model, params, t, x, y), axis1=1, axis2=2)
    assert rel_err(model.divergence(params, t, x, y), trace) < EXACT
    c = rng.standard_normal(x.shape[0])
    got = autograd.grad(lambda p, xx: anp.sum(c * model.divergence(p, t, xx, y)), (0, 1))(params, x)
    ref = autograd.grad(lambda p, xx: anp.sum(c * R.divergence(model, p, t, xx, y)), (0, 1))(params, x)
    assert rel_err(got[0], ref[0]) < EXACT and rel_err(got[1], ref[1]) < EXACT


def test_jacobian_through_the_primitive_calls_the_vjp_repeatedly():
    # autograd.jacobian runs one backward pass per output entry on the same graph:
    # the forward cache must survive every one of them.
    model, params, t, x, y, _ = make_case("silu", 3, 1, n=3, hidden=(6,))
    J = autograd.jacobian(lambda p: model.apply(p, t, x, y))(params)
    J_ref = autograd.jacobian(lambda p: R.apply(model, p, t, x, y))(params)
    assert rel_err(J, J_ref) < EXACT


def test_vjp_is_unaffected_by_calls_in_between():
    # the work arrays of a pending VJP are not lent to other calls
    model, params, t, x, _, rng = make_case("silu", None, 0, n=32, hidden=(16, 16))
    g = rng.standard_normal(x.shape)
    u, vjp = model.value_and_vjp(params, t, x)
    expected = vjp(g)
    for _ in range(3):  # same shapes: would reuse the arrays if they were free
        model.apply(params, t, rng.standard_normal(x.shape))
        model.value_and_vjp(params, t, rng.standard_normal(x.shape))[1](g)
        model.divergence(params, t, rng.standard_normal(x.shape))
    again = vjp(g)
    assert np.array_equal(again[0], expected[0]) and np.array_equal(again[1], expected[1])


# ------------------------------------------------------------------ finite differences

FD_STEP = 1e-5
# Central difference along a unit direction: truncation h^2 |f'''| / 6 ~ 1e-11
# and rounding eps |f| / h ~ 2e-11 relative to O(1) derivatives; 1e-7 leaves a
# margin of several thousand for the unknown constants, and a wrong
# derivative is O(1) off.
FD_TOL = 1e-7


def fd_error(f, vjp, x0, rng):
    """Error of <w, J v> from a VJP against a central difference (the check_grads pattern).

    Relative to ||w|| ||J v||, the size of the product before any cancellation.
    """
    y0 = f(x0)
    v = rng.standard_normal(x0.shape)
    v /= np.linalg.norm(v)
    w = rng.standard_normal(np.shape(y0))
    exact = np.sum(vjp(w) * v)
    jv = (f(x0 + FD_STEP * v) - f(x0 - FD_STEP * v)) / (2 * FD_STEP)
    return abs(exact - np.sum(w * jv)) / (np.linalg.norm(w) * np.linalg.norm(jv))


@pytest.mark.parametrize("act,nc,F", CONFIGS)
def test_gradients_agree_with_central_differences(act, nc, F):
    # small network, few points: with relu the chance that a +-1e-5 step crosses a kink is tiny
    model, params, t, x, y, rng = make_case(act, nc, F, n=4, hidden=(8, 8), seed=3)
    vjp_p = lambda w: autograd.make_vjp(lambda p: model.apply(p, t, x, y))(params)[0](w)
    assert fd_error(lambda p: model.apply(p, t, x, y), vjp_p, params, rng) < FD_TOL
    vjp_x = lambda w: autograd.make_vjp(lambda xx: model.apply(params, t, xx, y))(x)[0](w)
    assert fd_error(lambda xx: model.apply(params, t, xx, y), vjp_x, x, rng) < FD_TOL
    vjp_d = lambda w: autograd.make_vjp(lambda p: model.divergence(p, t, x, y))(params)[0](w)
    assert fd_error(lambda p: model.divergence(p, t, x, y), vjp_d, params, rng) < FD_TOL


def test_planted_wrong_activation_derivative_fails_the_difference_check():
    # negative control: the VJP with sigma(z) where sigma'(z) belongs (a classic slip)
    model, params, t, x, y, rng = make_case("silu", None, 0, n=4, hidden=(8, 8), seed=3)

    def wrong_vjp(w):
        ctx = model._call(params, t, x, None)
        ctx.forward()
        hs, Ds = ctx.cache
        for (W, b), h, D in zip(model.unflatten(params).layers, hs, Ds):
            D[...] = 1.0 / (1.0 + np.exp(-(h @ W + b)))
        return ctx.backward(w, (0,))[0]

    assert fd_error(lambda p: model.apply(p, t, x, y), lambda w: model.value_and_vjp(params, t, x)[1](w)[0],
                    params, rng) < FD_TOL
    err = fd_error(lambda p: model.apply(p, t, x, y), wrong_vjp, params, rng)
    assert err > 1e3 * FD_TOL


def test_planted_missing_second_derivative_fails_against_the_reference():
    # negative control for the divergence VJP: drop the sigma'' term
    model, params, t, x, y, rng = make_case("silu", None, 0, n=5, hidden=(8, 8))
    c = rng.standard_normal(x.shape[0])
    ref = autograd.grad(lambda p: anp.sum(c * R.divergence(model, p, t, x)))(params)
    ctx = model._call(params, t, x, None)
    ctx.div_forward()
    for D2 in ctx.cache[3]:
        D2[...] = 0.0
    wrong = ctx.div_backward(c, (0,))[0]
    assert rel_err(wrong, ref) > 1e-3


def test_planted_missing_diagonal_term_fails_the_trace_check():
    model, params, t, x, y, _ = make_case("tanh", None, 0)
    J = R.jacobian(model, params, t, x)
    div = model.divergence(params, t, x)
    assert rel_err(div, np.trace(J, axis1=1, axis2=2)) < EXACT
    assert rel_err(div - J[:, 0, 0], np.trace(J, axis1=1, axis2=2)) > 1e-3


# ------------------------------------------------------------------ the fast exp and activations

def test_fast_exp_is_accurate_to_a_few_ulp():
    rng = np.random.default_rng(0)
    for dt, lowest, ulps in ((np.float64, -700.0, 4), (np.float32, -80.0, 4)):
        x = np.concatenate([-np.abs(rng.standard_normal(20000)) * 30, [0.0, -1e-30, -0.3465, -0.3466, -1.0]])
        x = np.maximum(x, lowest).astype(dt)
        out = np.empty_like(x)
        K.exp_nonpos_array(x, out)
        ref = np.exp(x.astype(np.longdouble))
        err = np.abs(out - ref) / ref / np.finfo(dt).eps
        assert err.max() <= ulps, (dt, err.max())


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dt", [np.float64, np.float32])
def test_activation_kernels_match_long_double(act, dt):
    rng = np.random.default_rng(1)
    z = (rng.standard_normal(20000) * np.exp(rng.uniform(-8, 4, 20000))).astype(dt)
    a, d1, d2 = np.empty_like(z), np.empty_like(z), np.empty_like(z)
    K.KERNELS[act].act_array(z, a, d1, d2)
    zl = z.astype(np.longdouble)
    s, sc = 1 / (1 + np.exp(-zl)), 1 / (1 + np.exp(zl))
    th, sech2 = np.tanh(zl), 1 / np.cosh(zl) ** 2
    ref = {
        "silu": (zl * s, s * (1 + zl * sc), s * sc * (2 + zl * (sc - s))),
        "tanh": (th, sech2, -2 * th * sech2),
        "relu": (np.maximum(zl, 0), (zl > 0).astype(np.longdouble), 0 * zl),
        "softplus": (np.logaddexp(np.longdouble(0), zl), s, s * sc),
    }[act]
    eps = np.finfo(dt).eps
    for got, want in zip((a, d1, d2), ref):
        # error against the size of the terms that make up the value (a root of
        # sigma' or sigma'' can't be hit to a few ulp *relative*)
        scale = np.maximum(np.abs(want), 1.0) if act == "silu" else np.abs(want)
        ok = scale > 100 * np.finfo(dt).tiny
        err = np.abs(got[ok] - want[ok]) / scale[ok] / eps
        assert err.max(initial=0.0) <= 16, (act, err.max())
    if act == "relu":
        assert np.array_equal(d2, np.zeros_like(d2)) and np.array_equal(d1, (z > 0).astype(dt))


def test_kernels_are_compiled_once_per_dtype():
    # inputs of other layouts and dtypes are converted before they reach the
    # kernels: one machine-code specialisation per float width, never more
    model = MLP(3, (8, 6, 5), "silu", n_classes=3, fourier_features=1)
    params = model.init_params(0)
    x = np.random.default_rng(0).standard_normal((7, 3))
    for xx in (x, np.asfortranarray(x), x.astype(np.float32), x[:, ::-1][:, ::-1], (10 * x).astype(int)):
        model.apply(params, 0.4, xx, 1)
        model.divergence(params, np.linspace(0, 1, 7), xx, [0, 1, 2, -1, 0, 1, 2])
        autograd.grad(lambda p: anp.sum(model.apply(p, 0.3, xx) ** 2))(params)
        autograd.grad(lambda p: anp.sum(model.divergence(p, 0.3, xx)))(params)
        model.field(params.astype(np.float32), 2)(0.5, xx)
    kernels = list(vars(K.KERNELS["silu"]).values()) + [K.dact_colsum, K.div_layer_bwd, K.div_first_bwd,
                                                        K.scatter_add_rows]
    for kernel in kernels:
        widths = [sig[0].dtype for sig in kernel.signatures]
        assert len(widths) == len(set(widths)), (kernel, kernel.signatures)


# ------------------------------------------------------------------ float32

@pytest.mark.parametrize("act", ["silu"])  # each (activation, dtype) compiles its kernels: keep it short
def test_float32_agrees_with_float64(act):
    # Rounding bound: each layer's dot products over <= 64 terms carry at most
    # ~H u relative error (u = 6e-8) and activations a few ulp: (L + 1) H u
    # ~ 4 * 64 * 6e-8 = 1.5e-5 for 3 hidden layers; tolerance 1e-4.  The
    # divergence and gradients have the same depth; same bound.
    m64 = MLP(2, (64, 64, 64), act, n_classes=3, fourier_features=2)
    m32 = MLP(2, (64, 64, 64), act, n_classes=3, fourier_features=2, dtype=np.float32)
    rng = np.random.default_rng(0)
    p64 = m64.init_params(rng)
    p32 = p64.astype(np.float32)
    assert np.array_equal(m32.init_params(np.random.default_rng(0)), p32)
    x = rng.standard_normal((50, 2))
    t = rng.uniform(size=50)
    y = rng.integers(-1, 3, size=50)
    tol = 1e-4
    u32 = m32.apply(p32, t, x, y)
    assert u32.dtype == np.float32
    assert rel_err(u32, m64.apply(p64, t, x, y)) < tol
    assert rel_err(m32.divergence(p32, t, x, y), m64.divergence(p64, t, x, y)) < tol
    g = rng.standard_normal((50, 2))
    g32 = m32.value_and_vjp(p32, t, x, y)[1](g)
    g64 = m64.value_and_vjp(p64, t, x, y)[1](g)
    assert g32[0].dtype == np.float32
    assert rel_err(g32[0], g64[0]) < tol and rel_err(g32[1], g64[1]) < tol
    # and the tolerance is tight enough to see a 1e-3 change of one weight layer
    p_off = p64.copy()
    p_off[: 7 * 64] *= 1.001
    assert rel_err(u32, m64.apply(p_off, t, x, y)) > tol


def test_float32_autograd_gradient_has_the_params_dtype():
    model, params, t, x, y, _ = make_case("silu", None, 0, dtype=np.float32)
    grad = autograd.grad(lambda p: anp.sum(model.apply(p, t, x) ** 2))(params)
    assert params.dtype == np.float32 and grad.dtype == np.float32


# ------------------------------------------------------------------ layout, classes, config

def test_documented_layout():
    model = MLP(2, (5, 4), "tanh", n_classes=3, embed_dim=2, fourier_features=1)
    # z0 = [x (2), t, sin, cos, e_y (2)] -> d_in = 7
    assert model.d_in == 7
    expected = [("W1", 0, (7, 5)), ("b1", 35, (5,)), ("W2", 40, (5, 4)), ("b2", 60, (4,)),
                ("W3", 64, (4, 2)), ("b3", 72, (2,)), ("embedding", 74, (4, 2))]
    assert model.layout() == expected
    assert model.n_params == 82
    params = np.arange(82.0)
    net = model.unflatten(params)
    W1, b1 = net.layers[0]
    assert W1[1, 3] == 1 * 5 + 3  # row-major, rows = inputs
    assert net.embedding[3, 1] == 74 + 3 * 2 + 1  # row 3 = the null class
    W1[0, 0] = -1.0  # views, not copies
    assert params[0] == -1.0
    assert np.array_equal(model.flatten(net.layers, net.embedding), params)


def test_layout_by_hand_forward():
    # u computed with plain numpy from the documented layout
    model, params, t, x, y, _ = make_case("tanh", 3, 1)
    net = model.unflatten(params)
    tt = t[:, None]
    z = np.concatenate([x, tt, np.sin(2 * np.pi * tt), np.cos(2 * np.pi * tt),
                        net.embedding[np.where(y < 0, 3, y)]], axis=1)
    for W, b in net.layers[:-1]:
        z = np.tanh(z @ W + b)
    W, b = net.layers[-1]
    assert rel_err(model.apply(params, t, x, y), z @ W + b) < EXACT


def test_null_class():
    model, params, t, x, _, _ = make_case("silu", 3, 0)
    n = x.shape[0]
    u_none = model.apply(params, t, x)  # y=None on a conditional model: the null prompt
    assert np.array_equal(u_none, model.apply(params, t, x, -1))
    assert np.array_equal(u_none, model.apply(params, t, x, np.full(n, -1)))
    assert not np.allclose(u_none, model.apply(params, t, x, 0))
    # -1 reads the last table row: changing it moves the null field only
    p2 = params.copy()
    model.unflatten(p2).embedding[3] += 1.0
    assert not np.allclose(model.apply(p2, t, x, -1), u_none)
    assert np.array_equal(model.apply(p2, t, x, 1), model.apply(params, t, x, 1))


def test_scalar_and_vector_time_agree():
    model, params, _, x, _, _ = make_case("silu", None, 2)
    n = x.shape[0]
    assert np.array_equal(model.apply(params, 0.3, x), model.apply(params, np.full(n, 0.3), x))
    assert not np.allclose(model.apply(params, 0.3, x), model.apply(params, 0.7, x))


def test_config_roundtrip():
    model = MLP(3, (7, 5), "softplus", n_classes=4, embed_dim=2, fourier_features=3, dtype=np.float32)
    cfg = json.loads(json.dumps(model.config()))
    again = MLP.from_config(cfg)
    assert again.config() == model.config()
    params = model.init_params(5)
    x = np.random.default_rng(0).standard_normal((4, 3))
    assert np.array_equal(again.apply(params, 0.5, x, 2), model.apply(params, 0.5, x, 2))
    with pytest.raises(ValueError, match="n_params"):
        MLP.from_config({**cfg, "n_params": 3})
    with pytest.raises(ValueError, match="kind"):
        MLP.from_config({**cfg, "kind": "other"})
    clone = pickle.loads(pickle.dumps(model))
    assert np.array_equal(clone.apply(params, 0.5, x, 2), model.apply(params, 0.5, x, 2))


def test_field_is_bound_and_fast_path_equal():
    model, params, t, x, y, _ = make_case("silu", 3, 1)
    f = model.field(params, y)
    u = f(t, x)
    assert np.array_equal(u, model.apply(params, t, x, y))
    params[:] = 0.0  # the field copied its parameters
    assert np.array_equal(f(t, x), u)
    with pytest.raises(ValueError, match="x"):
        f(t, x[:, :1])


def test_seeded_initialisation_is_deterministic():
    model = MLP(2, (16, 16), "silu", n_classes=2)
    a = model.init_params(7)
    b = model.init_params(np.random.default_rng(7))
    assert a.shape == (model.n_params,) and a.dtype == np.float64
    assert np.array_equal(a, b)
    assert not np.array_equal(a, model.init_params(8))
    # PyTorch's default bounds: |W1| <= 1/sqrt(fan_in), table standard normal
    W1 = model.unflatten(a).layers[0][0]
    assert np.abs(W1).max() <= 1 / np.sqrt(model.d_in)
    assert np.abs(model.unflatten(a).embedding).max() > 1 / np.sqrt(model.d_in)
    # bit-identical evaluation run to run
    x = np.random.default_rng(0).standard_normal((20, 2))
    assert np.array_equal(model.apply(a, 0.5, x, 1), model.apply(b, 0.5, x, 1))


def test_empty_batch():
    model, params, _, _, _, _ = make_case("silu", 3, 0)
    x = np.zeros((0, 2))
    assert model.apply(params, 0.5, x).shape == (0, 2)
    assert model.divergence(params, 0.5, x).shape == (0,)
    grad = autograd.grad(lambda p: anp.sum(model.apply(p, 0.5, x)))(params)
    assert np.array_equal(grad, np.zeros_like(params))


# ------------------------------------------------------------------ bad input

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="activation"):
        MLP(2, (8,), "gelu")
    with pytest.raises(ValueError, match="dim"):
        MLP(0, (8,))
    with pytest.raises(TypeError, match="hidden"):
        MLP(2, ())
    with pytest.raises(ValueError, match="hidden"):
        MLP(2, (8, 0))
    with pytest.raises(ValueError, match="dtype"):
        MLP(2, (8,), dtype=np.float16)
    with pytest.raises(ValueError, match="n_classes"):
        MLP(2, (8,), n_classes=0)
    with pytest.raises(ValueError, match="fourier_features"):
        MLP(2, (8,), fourier_features=-1)
    with pytest.raises(TypeError, match="rng"):
        MLP(2, (8,)).init_params(None)


def test_bad_call_arguments_name_the_argument():
    model, params, t, x, _, _ = make_case("silu", None, 0)
    cond, cparams, _, _, _, _ = make_case("silu", 3, 0)
    n = x.shape[0]
    cases = [
        (ValueError, r"params: .*\(%d,\).*\(%d,\)" % (model.n_params, model.n_params - 1),
         lambda: model.apply(params[:-1], t, x)),
        (ValueError, "params", lambda: model.apply(params.reshape(1, -1), t, x)),
        (ValueError, "params: expected finite", lambda: model.apply(np.where(np.arange(len(params)) == 3, np.nan, params), t, x)),
        (TypeError, "params", lambda: model.apply("abc", t, x)),
        (ValueError, r"x: expected 2 columns", lambda: model.apply(params, t, x[:, :1])),
        (ValueError, "x: expected a 2-D", lambda: model.apply(params, t, x[0])),
        (ValueError, "x: expected finite", lambda: model.apply(params, t, np.full((2, 2), np.inf))),
        (ValueError, r"t: expected values in \[0, 1\]", lambda: model.apply(params, 1.5, x)),
        (ValueError, r"t: expected shape \(%d,\)" % n, lambda: model.apply(params, t[:-1], x)),
        (ValueError, "y: expected None for an unconditional model", lambda: model.apply(params, t, x, 0)),
        (ValueError, "y: expected labels < 3", lambda: cond.apply(cparams, t, x, 3)),
        (ValueError, "y: expected labels >= -1", lambda: cond.apply(cparams, t, x, -2)),
        (TypeError, "y: expected integer", lambda: cond.apply(cparams, t, x, 0.5)),
        (ValueError, r"y: expected shape \(%d,\)" % n, lambda: cond.apply(cparams, t, x, np.zeros(n + 1, int))),
        (ValueError, "x: expected 2 columns", lambda: model.divergence(params, t, x[:, :1])),
        (ValueError, "g: expected a cotangent", lambda: model.value_and_vjp(params, t, x)[1](np.ones((n, 3)))),
    ]
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()


def test_differentiating_with_respect_to_t_is_refused():
    model, params, t, x, _, _ = make_case("silu", None, 0)
    with pytest.raises(TypeError, match="t: differentiation"):
        autograd.grad(lambda tt: anp.sum(model.apply(params, tt, x)))(0.5)


# ------------------------------------------------------------------ verification checks

@pytest.mark.parametrize("name", ["nn.apply_vjp_vs_reference", "nn.divergence_vs_jacobian_trace",
                                  "nn.divergence_vjp_vs_reference", "nn.vjp_finite_differences"])
def test_registered_check_passes_and_catches_its_control(name):
    from refflow.verify.registry import registered, run_check

    (entry,) = [e for e in registered() if e.name == name]
    result = run_check(entry, quick=True)
    assert result.error <= result.tolerance, result
    assert result.control_error > result.tolerance, "negative control slipped through"
    assert result.passed
