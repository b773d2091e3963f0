"""Tests of refflow.solvers: Algorithm 2 and its higher-order / adaptive
relatives (eq 6-10), and classifier-free guidance (eq 40).

Ground truth is the closed-form Gaussian flow of
``refflow.verify.checks.solvers`` (itself tested against eq 10 below).
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
from hypothesis import given, settings
from hypothesis import strategies as st

from refflow import solvers
from refflow.solvers import FIXED_STEP_METHODS, SCIPY_METHODS, guided_field, integrate, sample
from refflow.verify.checks import solvers as checks
from refflow.verify.registry import registered, run_check


@pytest.fixture
def cosine():
    return checks.cosine_problem()


@pytest.fixture
def ot():
    return checks.ot_problem()


@pytest.fixture
def x0():
    return np.random.default_rng(20240701).standard_normal((12, 3))


# --------------------------------------------------------------------------
# The ground-truth problem itself
# --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [checks.ot_problem, checks.cosine_problem])
def test_exact_flow_solves_eq10(make, x0):
    # d/dt psi_{0->t}(x0) = u_t(psi_{0->t}(x0)), by central differences (error ~h^2).
    problem = make()
    h = 1e-5
    for t in (0.1, 0.5, 0.9):
        dpsi = (problem.flow(x0, 0.0, t + h) - problem.flow(x0, 0.0, t - h)) / (2 * h)
        u = problem.velocity(t, problem.flow(x0, 0.0, t))
        np.testing.assert_allclose(dpsi, u, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(problem.flow(x0, 0.0, 0.0), x0, rtol=0, atol=1e-15)
    # psi_{a->b} composes: psi_{0.3->1} o psi_{0->0.3} = psi_{0->1}.
    np.testing.assert_allclose(
        problem.flow(problem.flow(x0, 0.0, 0.3), 0.3, 1.0), problem.flow(x0, 0.0, 1.0), rtol=1e-14, atol=1e-14
    )


# --------------------------------------------------------------------------
# Algorithm 2 and the fixed-step methods
# --------------------------------------------------------------------------


def test_euler_is_algorithm_2_bit_for_bit(cosine, x0):
    n_steps = 37
    delta = 1.0 / n_steps
    x_t = x0.copy()
    for k in range(n_steps):
        t = k * delta
        x_t = x_t + delta * cosine.velocity(t, x_t)
    sol = integrate(cosine.velocity, x0, method="euler", n_steps=n_steps)
    assert np.array_equal(sol.x, x_t)


@pytest.mark.parametrize("name", list(FIXED_STEP_METHODS))
@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0), (0.2, 0.7), (0.9, 0.35)])
def test_convergence_order(name, t0, t1, cosine, x0):
    method = FIXED_STEP_METHODS[name]
    start = cosine.flow(x0, 0.0, t0)
    slope, deltas, errors = checks.measure_order(method, cosine, start, t0, t1)
    assert abs(slope - method.order) <= 0.3, (name, slope, errors)
    assert np.all(errors > 1e-13)  # the fit saw truncation error, not rounding


@pytest.mark.parametrize("wrong", [checks.WRONG_RK4, checks.WRONG_MIDPOINT])
def test_order_test_rejects_wrong_methods(wrong, cosine, x0):
    slope, _, _ = checks.measure_order(wrong, cosine, x0, 0.0, 1.0)
    assert abs(slope - wrong.order) > 0.3, slope


def test_midpoint_superconverges_on_ot_gaussian(ot, x0):
    # Why the order check uses the cosine path: on the OT-path Gaussian
    # problem the midpoint method shows order 3, not 2.
    slope, _, _ = checks.measure_order("midpoint", ot, x0, 0.0, 1.0)
    assert abs(slope - 3.0) < 0.2


@pytest.mark.parametrize("name, stages", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
@pytest.mark.parametrize("n_steps", [1, 7, 100])
def test_fixed_step_nfe(name, stages, n_steps, cosine, x0):
    sol = integrate(cosine.velocity, x0, 1.0, 0.0, method=name, n_steps=n_steps)
    assert sol.nfe == stages * n_steps
    assert sol.n_steps == n_steps and sol.method == name


def test_fixed_step_round_trip_is_identity(cosine, x0):
    fwd = integrate(cosine.velocity, x0, 0.0, 1.0, method="rk4", n_steps=200)
    bwd = integrate(cosine.velocity, fwd.x, 1.0, 0.0, method="rk4", n_steps=200)
    np.testing.assert_allclose(bwd.x, x0, rtol=0, atol=1e-9)


def test_fixed_step_t_eval_on_grid(cosine, x0):
    t_eval = [0.5, 0.0, 1.0, 0.5, 0.3]  # any order, repeats allowed
    sol = integrate(cosine.velocity, x0, method="rk4", n_steps=100, t_eval=t_eval)
    assert sol.xs.shape == (5, 12, 3)
    np.testing.assert_allclose(sol.ts, t_eval, rtol=0, atol=1e-15)
    assert np.array_equal(sol.xs[1], x0)
    assert np.array_equal(sol.xs[2], sol.x)
    assert np.array_equal(sol.xs[0], sol.xs[3])
    # The recorded state is the state of the same steps run only that far.
    half = integrate(cosine.velocity, x0, 0.0, 0.5, method="rk4", n_steps=50)
    assert np.array_equal(sol.xs[0], half.x)
    np.testing.assert_allclose(sol.xs[4], cosine.flow(x0, 0.0, 0.3), atol=1e-8)
    # Grid times computed another way (0.1 * 3 != 0.3) still match.
    sol = integrate(cosine.velocity, x0, method="euler", n_steps=10, t_eval=np.arange(11) * 0.1)
    assert sol.xs.shape == (11, 12, 3)


def test_fixed_step_t_eval_off_grid_is_refused(cosine, x0):
    with pytest.raises(ValueError, match="t_eval.*grid"):
        integrate(cosine.velocity, x0, method="rk4", n_steps=10, t_eval=[0.05])


def test_fixed_step_t_eval_backward(cosine, x0):
    x1 = cosine.flow(x0, 0.0, 1.0)
    sol = integrate(cosine.velocity, x1, 1.0, 0.0, method="rk4", n_steps=80, t_eval=[0.25, 1.0, 0.0])
    np.testing.assert_allclose(sol.xs[0], cosine.flow(x0, 0.0, 0.25), atol=1e-6)
    assert np.array_equal(sol.xs[1], x1)
    assert np.array_equal(sol.xs[2], sol.x)


def test_custom_fixed_step_method(cosine, x0):
    # A FixedStepMethod goes through the same driver; here a Ralston RK2.
    def ralston(u, t, delta, x_t):
        k_1 = u(t, x_t)
        k_2 = u(t + 2.0 * delta / 3.0, x_t + (2.0 * delta / 3.0) * k_1)
        return x_t + delta * (0.25 * k_1 + 0.75 * k_2)

    method = solvers.FixedStepMethod("ralston", 2, 2, ralston)
    slope, _, _ = checks.measure_order(method, cosine, x0)
    assert abs(slope - 2.0) <= 0.3
    assert integrate(cosine.velocity, x0, method=method, n_steps=5).method == "ralston"


# --------------------------------------------------------------------------
# scipy.integrate.solve_ivp
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", SCIPY_METHODS)
@pytest.mark.parametrize("make", [checks.ot_problem, checks.cosine_problem])
def test_solve_ivp_within_tolerance(method, make, x0):
    problem = make()
    rtol, atol = 1e-5, 1e-7
    x1 = problem.flow(x0, 0.0, 1.0)
    magnitude = problem.path_max(x0, 0.0, 1.0)
    bound = checks.SCIPY_BOUNDS[method]
    fwd = integrate(problem.velocity, x0, 0.0, 1.0, method=method, rtol=rtol, atol=atol)
    assert checks.normalised_error(fwd.x, x1, rtol, atol, magnitude) <= bound
    bwd = integrate(problem.velocity, x1, 1.0, 0.0, method=method, rtol=rtol, atol=atol)
    assert checks.normalised_error(bwd.x, x0, rtol, atol, magnitude) <= bound
    # backward o forward = identity, to the same accuracy
    back = integrate(problem.velocity, fwd.x, 1.0, 0.0, method=method, rtol=rtol, atol=atol)
    assert checks.normalised_error(back.x, x0, rtol, atol, magnitude) <= 2 * bound
    assert fwd.method == method and fwd.n_steps is None and fwd.nfe > 0


@pytest.mark.parametrize("method", ["RK45", "DOP853", "Radau"])
def test_solve_ivp_tight_tolerance(method, cosine, x0):
    sol = integrate(cosine.velocity, x0, method=method, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(sol.x, cosine.flow(x0, 0.0, 1.0), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["RK23", "RK45", "DOP853"])
def test_solve_ivp_matches_direct_call(method, cosine, x0):
    # The wrapper is solve_ivp on the flattened batch: same result, same nfe.
    n, d = x0.shape
    direct = scipy.integrate.solve_ivp(
        lambda t, y: cosine.velocity(t, y.reshape(n, d)).ravel(), (0.0, 1.0), x0.ravel(),
        method=method, rtol=1e-6, atol=1e-8,
    )
    sol = integrate(cosine.velocity, x0, method=method, rtol=1e-6, atol=1e-8)
    assert np.array_equal(sol.x, direct.y[:, -1].reshape(n, d))
    assert sol.nfe == direct.nfev


def test_solve_ivp_t_eval(cosine, x0):
    t_eval = [0.7, 0.1, 0.7, 1.0, 0.0]
    rtol, atol = 1e-9, 1e-11
    for t0, t1 in ((0.0, 1.0), (1.0, 0.0)):
        start = cosine.flow(x0, 0.0, t0)
        sol = integrate(cosine.velocity, start, t0, t1, method="DOP853", rtol=rtol, atol=atol, t_eval=t_eval)
        assert sol.xs.shape == (5, 12, 3)
        np.testing.assert_array_equal(sol.ts, t_eval)
        for t, x_t in zip(t_eval, sol.xs):
            np.testing.assert_allclose(x_t, cosine.flow(x0, 0.0, t), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["Radau", "BDF", "LSODA"])
@pytest.mark.parametrize("d", [1, 4])
def test_implicit_methods_block_structure(method, d):
    # One point's Jacobian block is d x d; a diagonal linear field u = a(t) x
    # with a distinct rate per entry has the exact flow exp(A(t1) - A(t0)).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, d))
    rates = rng.uniform(-2.0, 2.0, size=(5, d))
    field = lambda t, x: rates * np.cos(t) * x  # noqa: E731
    sol = integrate(field, x, 0.0, 1.0, method=method, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(sol.x, x * np.exp(rates * np.sin(1.0)), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------
# What the field sees, and the degenerate interval
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4", *SCIPY_METHODS])
@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0)])
def test_field_sees_python_floats_inside_the_interval(method, t0, t1, cosine, x0):
    seen = []

    def field(t, x):
        seen.append(t)
        assert x.shape == x0.shape
        return cosine.velocity(t, x)

    sol = integrate(field, cosine.flow(x0, 0.0, t0), t0, t1, method=method, n_steps=49)
    assert len(seen) == sol.nfe
    assert all(type(t) is float for t in seen)
    assert min(seen) >= 0.0 and max(seen) <= 1.0


def test_empty_interval_returns_input(cosine, x0):
    for method in ("rk4", "RK45"):
        sol = integrate(cosine.velocity, x0, 0.4, 0.4, method=method, t_eval=[0.4])
        assert np.array_equal(sol.x, x0) and sol.nfe == 0
        assert np.array_equal(sol.xs[0], x0)


# --------------------------------------------------------------------------
# sample (Algorithm 2 from x_0 ~ N(0, I))
# --------------------------------------------------------------------------


def test_sample_is_algorithm_2_and_reproducible(cosine):
    a = sample(cosine.velocity, 50, 3, 7, n_steps=20)
    b = sample(cosine.velocity, 50, 3, np.random.default_rng(7), n_steps=20)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.x0, b.x0)
    assert np.array_equal(a.x0, np.random.default_rng(7).standard_normal((50, 3)))
    assert a.method == "euler" and a.nfe == 20
    c = integrate(cosine.velocity, a.x0, method="euler", n_steps=20)
    assert np.array_equal(a.x, c.x)


def test_sample_reaches_the_target(cosine):
    sol = sample(cosine.velocity, 4000, 3, 11, method="rk4", n_steps=50)
    # x_1 = psi(x_0) exactly in law N(m, s^2): compare with the exact map.
    np.testing.assert_allclose(sol.x, cosine.flow(sol.x0, 0.0, 1.0), atol=1e-6)
    z = (sol.x.mean(axis=0) - cosine.m) / (cosine.s / np.sqrt(4000))
    assert np.all(np.abs(z) < 4)


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"method": "rk5"}, ValueError, "method.*rk5"),
        ({"method": 4}, TypeError, "method"),
        ({"n_steps": 0}, ValueError, "n_steps"),
        ({"n_steps": 2.5}, TypeError, "n_steps"),
        ({"t0": -0.1}, ValueError, "t0.*\\[0.0, 1.0\\].*-0.1"),
        ({"t1": 1.5}, ValueError, "t1.*\\[0.0, 1.0\\].*1.5"),
        ({"t1": np.array([0.5, 1.0])}, TypeError, "t1"),
        ({"t1": float("nan")}, ValueError, "t1"),
        ({"rtol": 0.0}, ValueError, "rtol"),
        ({"atol": -1.0}, ValueError, "atol"),
        ({"t_eval": [1.2]}, ValueError, "t_eval"),
        ({"t0": 0.2, "t1": 0.6, "t_eval": [0.1]}, ValueError, "t_eval.*interval"),
        ({"t_eval": []}, ValueError, "t_eval"),
    ],
)
def test_bad_arguments(kwargs, exc, pattern, cosine, x0):
    with pytest.raises(exc, match=pattern):
        integrate(cosine.velocity, x0, **kwargs)


def test_bad_points_and_field(cosine, x0):
    with pytest.raises(ValueError, match="x"):
        integrate(cosine.velocity, x0[0])
    with pytest.raises(ValueError, match="x.*finite"):
        integrate(cosine.velocity, np.full((2, 3), np.nan))
    with pytest.raises(TypeError, match="field"):
        integrate("not a field", x0)
    with pytest.raises(TypeError, match="rng"):
        sample(cosine.velocity, 3, 3, None)
    with pytest.raises(ValueError, match="n"):
        sample(cosine.velocity, 0, 3, 1)
    with pytest.raises(ValueError, match="dim"):
        sample(cosine.velocity, 3, 0, 1)


@pytest.mark.parametrize("method", ["rk4", "RK45", "LSODA"])
def test_bad_field_outputs(method, x0):
    with pytest.raises(ValueError, match=r"field.*shape \(12, 3\).*got shape \(12,\)"):
        integrate(lambda t, x: x[:, 0], x0, method=method)
    with pytest.raises(ValueError, match=r"field.*shape.*got shape \(1, 3\)"):
        integrate(lambda t, x: x[:1], x0, method=method)  # no silent broadcasting
    with pytest.raises(ValueError, match="field.*finite.*t=0.5"):
        integrate(lambda t, x: np.full_like(x, np.nan) if t >= 0.5 else x, x0, method=method, n_steps=2)
    with pytest.raises(TypeError, match="field.*real"):
        integrate(lambda t, x: x.astype(complex), x0, method=method)


# --------------------------------------------------------------------------
# Guidance (eq 40)
# --------------------------------------------------------------------------


def _conditional_field(t, x, y):
    # Distinct, nonlinear responses per label; label -1 (null) included.
    y = np.asarray(y)
    return np.sin(x * (y[:, None] + 2.0)) + t * (y[:, None] + 0.5)


@pytest.fixture
def labels():
    return np.array([0, 1, 2, 1, 0, 3, 2, 1, 0, 0, 1, 2])


def test_guidance_w1_conditional_w0_unconditional(x0, labels):
    t = 0.3
    u_cond = _conditional_field(t, x0, labels)
    u_null = _conditional_field(t, x0, np.full(12, -1))
    assert np.array_equal(guided_field(_conditional_field, labels, 1.0)(t, x0), u_cond)
    assert np.array_equal(guided_field(_conditional_field, labels, 0.0)(t, x0), u_null)
    assert np.array_equal(guided_field(_conditional_field, labels, 0.0, "flow_matching")(t, x0), u_cond)
    assert np.array_equal(guided_field(_conditional_field, labels, -1.0, "flow_matching")(t, x0), u_null)


def test_guidance_formula(x0, labels):
    t, w = 0.8, 3.0
    u_cond = _conditional_field(t, x0, labels)
    u_null = _conditional_field(t, x0, np.full(12, -1))
    np.testing.assert_allclose(
        guided_field(_conditional_field, labels, w)(t, x0), (1 - w) * u_null + w * u_cond, rtol=1e-15, atol=1e-15
    )
    np.testing.assert_allclose(
        guided_field(_conditional_field, labels, w, "flow_matching")(t, x0),
        (1 + w) * u_cond - w * u_null, rtol=1e-15, atol=1e-15,
    )


@settings(max_examples=50, deadline=None)
@given(w_fm=st.floats(-5.0, 20.0), t=st.floats(0.0, 1.0))
def test_guidance_conventions_map(w_fm, t):
    # w_notes = 1 + w_fm, up to the rounding of 1 + w_fm.
    x = np.random.default_rng(0).standard_normal((12, 3))
    labels = np.arange(12) % 4
    fm = guided_field(_conditional_field, labels, w_fm, "flow_matching")
    notes = guided_field(_conditional_field, labels, 1.0 + w_fm, "notes")
    assert fm.w_notes == notes.w_notes
    scale = (1.0 + 2.0 * abs(w_fm)) * np.max(np.abs(_conditional_field(t, np.vstack([x, x]), np.r_[labels, -np.ones(12, int)])))
    assert np.max(np.abs(fm(t, x) - notes(t, x))) <= 8 * np.finfo(float).eps * scale


def test_guidance_scalar_prompt_and_null_label(x0):
    calls = []

    def field(t, x, y):
        calls.append(np.array(y))
        return _conditional_field(t, x, y)

    g = guided_field(field, 2, 1.5)
    g(0.1, x0)
    assert len(calls) == 2
    assert np.all(calls[0] == -1) and np.all(calls[1] == 2)
    np.testing.assert_array_equal(g(0.1, x0), guided_field(_conditional_field, np.full(12, 2), 1.5)(0.1, x0))


def test_guided_sampling_matches_closed_form():
    outcome = checks.check_guided_sampling(np.random.default_rng(5), True)
    assert outcome.error <= outcome.tolerance < outcome.control_error


@pytest.mark.parametrize(
    "args, exc, pattern",
    [
        ((np.arange(3), float("nan")), ValueError, "w.*finite"),
        ((np.arange(3), float("inf")), ValueError, "w"),
        ((np.arange(3), "2"), TypeError, "w"),
        ((np.arange(3), True), TypeError, "w"),
        ((np.array([0, -2, 1]), 2.0), ValueError, "y.*-1"),
        ((np.array([0.5, 1.0, 2.0]), 2.0), TypeError, "y"),
        ((np.zeros((3, 1), int), 2.0), ValueError, "y"),
        ((None, 2.0), TypeError, "y"),
    ],
)
def test_guidance_bad_arguments(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        guided_field(_conditional_field, *args)


def test_guidance_bad_convention_and_batch(x0):
    with pytest.raises(ValueError, match="convention"):
        guided_field(_conditional_field, 1, 2.0, convention="cfg")
    with pytest.raises(TypeError, match="field"):
        guided_field(None, 1, 2.0)
    with pytest.raises(ValueError, match=r"y.*\(12,\)"):
        guided_field(_conditional_field, np.arange(5), 2.0)(0.5, x0)
    with pytest.raises(ValueError, match="field.*shape"):
        guided_field(lambda t, x, y: x[:, :1], 1, 2.0)(0.5, x0)


# --------------------------------------------------------------------------
# The registered verification checks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["solvers.order", "solvers.solve_ivp", "guidance.eq40", "guidance.sampling"])
def test_registered_checks_pass_and_catch_their_controls(name):
    (entry,) = [e for e in registered() if e.name == name]
    assert entry.quick
    result = run_check(entry)
    assert result.passed, result
    assert result.control_caught
