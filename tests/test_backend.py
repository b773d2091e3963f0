"""Backends (refflow.backend): one test body per backend, GPU results held to the CPU's.

The ``backend`` fixture runs each test on "numpy" always and on "cupy" when
CuPy and a CUDA device are present (skipped with the reason otherwise;
``REFFLOW_REQUIRE_CUPY=1`` turns that skip into a failure, for the GPU
check script).  Inputs are drawn once on the host and moved with
``to_device``; the GPU and CPU random streams differ, so nothing here
compares random draws across backends.

Tolerances: float64 results agree with the CPU to 1e-10 relative (the same
formulas; only the order of floating-point sums differs).  float32 MLP
results agree to 1e-4 of the largest entry (about 1000 float32 ulps: cuBLAS
sums the 256-term products in another order and may use other tiling).

On the "numpy" backend the MLP runs with ``elementwise="array"``: the array
operations the GPU uses, held to the Numba kernels on the CPU.  That is how
the GPU code path is checked on a machine without a GPU.
"""
import os

import numpy as np
import pytest
import scipy.special
from autograd import grad
from autograd.test_util import check_grads

import refflow as rf
from refflow import backend as B
from refflow import cnf, solvers
from refflow.nn import MLP
from refflow.nn import _kernels as K
from refflow.targets import Empirical, logsumexp
from refflow.train import Adam, _loss_and_grad, train

AVAILABLE = B.available_backends()
RTOL = 1e-10


@pytest.fixture(params=["numpy", "cupy"])
def backend(request):
    name = request.param
    if name not in AVAILABLE:
        try:
            B.get_namespace(name)
        except B.BackendUnavailableError as exc:
            reason = str(exc)
        else:  # pragma: no cover
            reason = "unavailable"
        if os.environ.get("REFFLOW_REQUIRE_CUPY") == "1":
            pytest.fail(f"REFFLOW_REQUIRE_CUPY=1 but {reason}")
        pytest.skip(reason)
    return name


def dev(x, backend):
    return B.to_device(x, backend)


def host(x):
    return np.asarray(B.to_host(x))


def assert_close(got, expected, rtol=RTOL, what=""):
    got, expected = host(got), np.asarray(expected)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    err = float(np.max(np.abs(got - expected))) / scale
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


def _device_model(backend, **kw):
    # On NumPy the array-operation path (what CuPy runs), on CuPy the default.
    return MLP(**kw, elementwise="array" if backend == "numpy" else "auto")


# ---------------------------------------------------------------- the module itself

def test_numpy_is_always_available_and_round_trips():
    assert AVAILABLE[0] == "numpy"
    x = np.arange(6.0).reshape(3, 2)
    assert B.to_host(x) is x and B.to_device(x, "numpy") is x
    assert B.namespace_of(x, 1.0, None) is np


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend: expected one of"):
        B.get_namespace("jax")


@pytest.mark.skipif("cupy" in AVAILABLE, reason="CuPy and a GPU are present here")
def test_missing_cupy_is_a_clear_error():
    with pytest.raises(B.BackendUnavailableError, match="cupy") as info:
        B.get_namespace("cupy")
    msg = str(info.value)
    assert "not installed" in msg or "no CUDA device" in msg
    with pytest.raises(B.BackendUnavailableError):
        B.to_device(np.zeros(2), "cupy")
    with pytest.raises(B.BackendUnavailableError):
        train(MLP(2, (4,)), rf.eight_gaussians(), rf.OTPath(), steps=1, rng=0, backend="cupy")


def test_logsumexp_matches_scipy_and_differentiates():
    a = np.random.default_rng(0).standard_normal((5, 4)) * 30
    a[0, 1] = -np.inf
    np.testing.assert_allclose(logsumexp(a, 1), scipy.special.logsumexp(a, axis=1), rtol=1e-14)
    with np.errstate(divide="ignore"):  # log(0) for a row of zero weights, as scipy
        assert np.all(logsumexp(np.full((2, 3), -np.inf), 1) == -np.inf)
    check_grads(lambda v: logsumexp(v, 1), modes=["rev"], order=2)(a[1:])


# ---------------------------------------------------------------- paths and targets

@pytest.mark.parametrize("path", [rf.OTPath(0.05), rf.VPPath(), rf.VEPath(), rf.CosinePath(),
                                  rf.PolynomialPath(1.5), rf.LinearVPPath()], ids=repr)
def test_paths_on_backend(backend, path):
    rng = np.random.default_rng(1)
    x_0, x_1, x = (rng.standard_normal((7, 3)) for _ in range(3))
    for t in (0.3, rng.uniform(0.05, 0.95, 7)):
        td = t if np.ndim(t) == 0 else dev(t, backend)
        args = [dev(v, backend) for v in (x_0, x_1)]
        assert_close(path.sample(*args, td), path.sample(x_0, x_1, t), what="sample")
        assert_close(path.target(*args, td), path.target(x_0, x_1, t), what="target")
        xd, x1d = dev(x, backend), dev(x_1, backend)
        assert_close(path.conditional_velocity(xd, x1d, td), path.conditional_velocity(x, x_1, t), what="u(x|x1)")
        assert_close(path.conditional_log_prob(xd, x1d, td), path.conditional_log_prob(x, x_1, t), what="log p")


def _targets():
    rng = np.random.default_rng(2)
    return {
        "full-cov": rf.random_mixture(3, 4, rng),
        "isotropic": rf.eight_gaussians(),
        "empirical": Empirical(rng.standard_normal((6, 2))),
    }


@pytest.mark.parametrize("kind", ["full-cov", "isotropic", "empirical"])
@pytest.mark.parametrize("path", [rf.OTPath(), rf.VPPath()], ids=repr)
def test_marginal_on_backend(backend, kind, path):
    target = _targets()[kind]
    m = target.marginal(path)
    rng = np.random.default_rng(3)
    x = 2.0 * rng.standard_normal((9, target.dim))
    names = ("log_prob", "velocity", "score", "divergence", "resp")
    for t in (0.0, 0.6, rng.uniform(0.0, 0.97, 9)):
        td = t if np.ndim(t) == 0 else dev(t, backend)
        got = m.evaluate(dev(x, backend), td, names)
        expected = m.evaluate(x, t, names)
        for key in names:
            assert B.namespace_of(got[key]) is B.get_namespace(backend), key
            assert_close(got[key], expected[key], what=key)
    if kind != "empirical":
        assert_close(target.log_prob(dev(x, backend)), target.log_prob(x), what="q_1")
        assert_close(target.score(dev(x, backend)), target.score(x), what="score q_1")


def test_marginal_blocks_on_backend(backend, monkeypatch):
    # Row blocks are concatenated on the backend of x.
    import refflow.targets as T

    monkeypatch.setattr(T, "_BLOCK", 64)
    monkeypatch.setattr(T, "_BLOCK_DEVICE", 64)
    m = rf.random_mixture(2, 3, 4).marginal(rf.OTPath())
    x = np.random.default_rng(4).standard_normal((50, 2))
    assert_close(m.velocity(dev(x, backend), 0.4), m.velocity(x, 0.4))


def test_mixed_backends_are_refused(backend):
    if backend == "numpy":
        pytest.skip("mixing needs a second backend")
    m = rf.eight_gaussians().marginal(rf.OTPath())
    x = dev(np.zeros((3, 2)), backend)
    with pytest.raises(TypeError, match="to_device"):
        m.velocity(x, np.full(3, 0.5))
    with pytest.raises(TypeError):
        rf.OTPath().sample(x, np.zeros((3, 2)), 0.5)


# ---------------------------------------------------------------- the MLP

MLP_CASES = [
    dict(dim=2, hidden=(32, 24, 16), activation="silu"),
    dict(dim=3, hidden=(16, 16), activation="tanh", n_classes=3, embed_dim=4, fourier_features=2),
    dict(dim=2, hidden=(16,), activation="softplus"),
    dict(dim=2, hidden=(16, 8), activation="relu", fourier_features=1),
]


@pytest.mark.parametrize("case", range(len(MLP_CASES)))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mlp_on_backend(backend, case, dtype):
    kw = dict(MLP_CASES[case], dtype=dtype)
    cpu, gpu = MLP(**kw), _device_model(backend, **kw)
    rtol = RTOL if dtype == np.float64 else 1e-4
    rng = np.random.default_rng(5)
    n = 13
    params = cpu.init_params(6)
    x = rng.standard_normal((n, cpu.dim)).astype(dtype)
    t = rng.random(n)
    y = rng.integers(-1, 3, n) if cpu.n_classes else None
    g = rng.standard_normal((n, cpu.dim)).astype(dtype)
    c = rng.standard_normal(n).astype(dtype)
    pd, xd, td = dev(params, backend), dev(x, backend), dev(t, backend)
    yd = None if y is None else dev(y, backend)

    assert_close(gpu.apply(pd, td, xd, yd), cpu.apply(params, t, x, y), rtol, "u")
    assert_close(gpu.apply(pd, 0.25, xd, yd), cpu.apply(params, 0.25, x, y), rtol, "u, float t")
    u, vjp = gpu.value_and_vjp(pd, td, xd, yd)
    u_ref, vjp_ref = cpu.value_and_vjp(params, t, x, y)
    gp, gx = vjp(dev(g, backend))
    gp_ref, gx_ref = vjp_ref(g)
    assert_close(u, u_ref, rtol, "u (vjp)")
    assert_close(gp, gp_ref, rtol, "vjp params")
    assert_close(gx, gx_ref, rtol, "vjp x")
    assert_close(gpu.divergence(pd, td, xd, yd), cpu.divergence(params, t, x, y), rtol, "divergence")
    ud, dd = gpu.field_and_divergence(pd, td, xd, yd)
    ud_ref, dd_ref = cpu.field_and_divergence(params, t, x, y)
    assert_close(ud, ud_ref, rtol, "u (stacked)")
    assert_close(dd, dd_ref, rtol, "div (stacked)")
    # the divergence VJP, the path of likelihood training
    ctx = gpu._call(pd, td, xd, yd)
    ctx.div_forward()
    gdp, gdx = ctx.div_backward(dev(c, backend), (0, 1))
    ctx_ref = cpu._call(params, t, x, y)
    ctx_ref.div_forward()
    gdp_ref, gdx_ref = ctx_ref.div_backward(c, (0, 1))
    assert_close(gdp, gdp_ref, rtol, "div vjp params")
    assert_close(gdx, gdx_ref, rtol, "div vjp x")


@pytest.mark.parametrize("activation", list(K.ACTIVATION_CODES))
def test_array_elementwise_matches_numba_to_1e12(activation):
    # The GPU's elementwise steps, run with NumPy, against the Numba kernels.
    kw = dict(dim=3, hidden=(24, 16, 8), activation=activation, n_classes=2, embed_dim=3, fourier_features=2)
    numba_model, array_model = MLP(**kw), MLP(**kw, elementwise="array")
    rng = np.random.default_rng(7)
    params = numba_model.init_params(8) * 3.0  # wide pre-activations: both tails of sigma
    x, t, y = 3.0 * rng.standard_normal((30, 3)), rng.random(30), rng.integers(-1, 2, 30)

    def div_sq(model):
        return grad(lambda p: (model.divergence(p, t, x, y) ** 2).sum())(params)

    def u_sq(model):
        return grad(lambda p, z: (model.apply(p, t, z, y) ** 2).sum(), argnum=(0, 1))(params, x)

    assert_close(array_model.apply(params, t, x, y), numba_model.apply(params, t, x, y), 1e-12)
    assert_close(array_model.divergence(params, t, x, y), numba_model.divergence(params, t, x, y), 1e-12)
    for got, expected in zip(u_sq(array_model), u_sq(numba_model)):
        assert_close(got, expected, 1e-12)
    assert_close(div_sq(array_model), div_sq(numba_model), 1e-12)


def test_array_elementwise_activation_values():
    z = np.linspace(-40.0, 40.0, 161)
    for name in K.ACTIVATION_CODES:
        out, d1, d2 = (np.empty_like(z) for _ in range(3))
        K.KERNELS[name].act_array(z, out, d1, d2)
        got = K._act_d2(np, name, z)
        for a, b in zip(got, (out, d1, d2)):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-300)


# ---------------------------------------------------------------- training, sampling, likelihood

def test_cfm_step_on_backend(backend):
    # One loss/gradient and Adam step on the same pre-drawn batch.
    model_cpu = MLP(2, (32, 32))
    model = _device_model(backend, dim=2, hidden=(32, 32))
    path = rf.OTPath()
    rng = np.random.default_rng(9)
    n = 64
    x_0, x_1, t = rng.standard_normal((n, 2)), rf.eight_gaussians().sample(n, 10), rng.random(n)
    params = model_cpu.init_params(11)
    value_ref, grad_ref = _loss_and_grad(model_cpu, path)(params, x_0, x_1, t, None)
    value, g = _loss_and_grad(model, path)(dev(params, backend), dev(x_0, backend), dev(x_1, backend),
                                            dev(t, backend), None)
    assert abs(float(value) - value_ref) <= RTOL * abs(value_ref)
    assert_close(g, grad_ref, what="grad")
    opt_ref, opt = Adam(lr=1e-2), Adam(lr=1e-2)
    p_ref, p = params, dev(params, backend)
    for _ in range(3):
        p_ref = opt_ref.update(p_ref, grad_ref)
        p = opt.update(p, dev(grad_ref, backend))
    assert_close(p, p_ref, what="adam")


def test_train_on_backend(backend):
    model = _device_model(backend, dim=2, hidden=(32, 32))
    state = train(model, rf.eight_gaussians(), rf.OTPath(), steps=40, batch_size=128, lr=3e-3,
                     rng=0, backend=backend)
    assert B.namespace_of(state.params) is B.get_namespace(backend)
    assert np.all(np.isfinite(state.losses)) and np.mean(state.losses[-10:]) < np.mean(state.losses[:10])


def test_mixture_sampling_on_backend(backend):
    gmm = rf.random_mixture(2, 3, 12, n_classes=2)
    rng = B.as_device_rng(13, backend)
    x, y, k = gmm.sample_with_labels(20000, rng)
    assert B.namespace_of(x) is B.get_namespace(backend)
    x, y, k = host(x), host(y), host(k)
    assert x.shape == (20000, 2) and np.array_equal(y, gmm.labels[k])
    mean = gmm.weights @ gmm.means
    se = np.sqrt(np.var(x, axis=0) / len(x))
    assert np.all(np.abs(x.mean(axis=0) - mean) < 5 * se)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_step_sampling_on_backend(backend, method):
    m = rf.random_mixture(2, 3, 14).marginal(rf.OTPath(0.01))
    model_cpu = MLP(2, (16, 16))
    model = _device_model(backend, dim=2, hidden=(16, 16))
    params = model_cpu.init_params(15)
    x = np.random.default_rng(16).standard_normal((20, 2))
    fields = [(m.field(), m.field()),
              (model.field(dev(params, backend)), model_cpu.field(params))]
    for field, field_ref in fields:
        sol = solvers.integrate(field, dev(x, backend), method=method, n_steps=16, t_eval=[0.5, 1.0])
        ref = solvers.integrate(field_ref, x, method=method, n_steps=16, t_eval=[0.5, 1.0])
        assert_close(sol.x, ref.x, what=f"{method} x_1")
        assert_close(sol.xs, ref.xs, what=f"{method} trajectory")
        assert sol.nfe == ref.nfe
    out = solvers.sample(m.field(), 5, 2, 17, method=method, n_steps=4, backend=backend)
    assert B.namespace_of(out.x) is B.get_namespace(backend)


def test_solve_ivp_is_cpu_only(backend):
    if backend == "numpy":
        pytest.skip("the refusal concerns GPU arrays")
    m = rf.eight_gaussians().marginal(rf.OTPath())
    with pytest.raises(TypeError, match="CPU-only.*fixed-step.*to_host"):
        solvers.integrate(m.field(), dev(np.zeros((3, 2)), backend), method="RK45")
    with pytest.raises(TypeError, match="CPU-only"):
        cnf.log_prob(cnf.marginal_field(m), dev(np.zeros((3, 2)), backend))


def test_exact_likelihood_on_backend(backend):
    m = rf.random_mixture(2, 3, 18).marginal(rf.OTPath(0.05))
    model_cpu = MLP(2, (16, 16))
    model = _device_model(backend, dim=2, hidden=(16, 16))
    params = model_cpu.init_params(19)
    x_1 = np.random.default_rng(20).standard_normal((15, 2))
    pairs = [(cnf.marginal_field(m), cnf.marginal_field(m)),
             (cnf.mlp_field(model, dev(params, backend)), cnf.mlp_field(model_cpu, params))]
    for field, field_ref in pairs:
        got = cnf.log_prob(field, dev(x_1, backend), method="rk4", n_steps=12)
        ref = cnf.log_prob(field_ref, x_1, method="rk4", n_steps=12)
        assert_close(got.log_p, ref.log_p, what="log p_1")
        assert_close(got.x_0, ref.x_0, what="x_0")
