"""Tests of refflow.cnf: the CNF log-likelihood (eq 11-14), Hutchinson's estimator,
the forward direction, the continuous limit of the Euler flow (eq 5-10), the
``refflow likelihood`` command, and the registered checks with their negative controls.

Ground truth: closed-form mixture marginals (eq 16, 19), affine fields with
Gaussian pushforwards (eq 2), the exact moments of Hutchinson's quadratic
form, and the exact log-determinants of the Euler map's residual layers.
"""
from __future__ import annotations

import os

import autograd.numpy as anp
import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from refflow import autodiff, cnf, targets
from refflow.paths import OTPath, VEPath
from refflow.verify.checks import cnf as checks
from refflow.verify.checks.paths import all_paths
from refflow.verify.registry import registered, run_check

TOL = checks.ODE_TOL
BOUND = checks.ODE_BOUND


@pytest.fixture(scope="module")
def mixture():
    return targets.random_mixture(2, 3, 7)


@pytest.fixture(scope="module")
def mlp_and_params():
    from refflow.nn import MLP

    mlp = MLP(2, (32, 32), "tanh")
    return mlp, 2.5 * mlp.init_params(np.random.default_rng(3))


@pytest.fixture
def x2():
    return np.random.default_rng(11).standard_normal((10, 2))


# --------------------------------------------------------------------------
# eq 14 against closed forms
# --------------------------------------------------------------------------


def test_standard_normal_log_prob():
    x = np.random.default_rng(0).standard_normal((5, 3))
    ref = scipy.stats.multivariate_normal(np.zeros(3), np.eye(3)).logpdf(x)
    np.testing.assert_allclose(cnf.standard_normal_log_prob(x), ref, rtol=1e-14)


@pytest.mark.parametrize("path", all_paths(), ids=repr)
def test_closed_form_marginal_every_path(path, mixture):
    # eq 14 driven by the closed-form marginal field reproduces the marginal's
    # log p_1; the marginal's own p_0 is the base (not N(0, I) on VE/VP).
    x_1 = mixture.sample(6, 1)
    marginal = mixture.marginal(path)
    res = cnf.log_prob(cnf.marginal_field(marginal), x_1, rtol=TOL, atol=TOL)
    assert res.divergence == "exact"
    assert np.max(np.abs(res.log_p - marginal.log_prob(x_1, 1.0))) < BOUND
    # x_0 is the flow's preimage: carrying it forward returns x_1 (eq 9).
    fwd = cnf.log_density_change(cnf.marginal_field(marginal), res.x_0, 0.0, 1.0, rtol=TOL, atol=TOL)
    assert np.max(np.abs(fwd[0] - x_1)) < BOUND


def test_ve_path_needs_its_own_base(mixture):
    # On VE, p_0 of the marginal is far from N(0, I): forcing the standard
    # normal base gives a visibly wrong answer, the marginal's own p_0 the right one.
    marginal = mixture.marginal(VEPath(0.01, 5.0))
    x_1 = mixture.sample(4, 2)
    field = cnf.marginal_field(marginal)
    right = cnf.log_prob(field, x_1, rtol=TOL, atol=TOL)
    wrong = cnf.log_prob(field, x_1, rtol=TOL, atol=TOL, base_log_prob=cnf.standard_normal_log_prob)
    truth = marginal.log_prob(x_1, 1.0)
    assert np.max(np.abs(right.log_p - truth)) < BOUND
    assert np.min(np.abs(wrong.log_p - truth)) > 0.1


def test_sign_flipped_divergence_is_wrong(mixture):
    # Negative control of eq 13: d log p / dt = +div instead of -div.
    marginal = mixture.marginal(OTPath())
    field = cnf.marginal_field(marginal)
    x_1 = mixture.sample(4, 3)
    res = cnf.log_prob(field, x_1, divergence=lambda t, x: -field.divergence(t, x), rtol=TOL, atol=TOL)
    assert np.min(np.abs(res.log_p - marginal.log_prob(x_1, 1.0))) > 1e-3


@pytest.mark.parametrize("div", ["exact", "autograd", "auto"])
def test_affine_field_gaussian_pushforward(div):
    rng = np.random.default_rng(5)
    field = checks.AffineField(0.6 * rng.standard_normal((3, 3)), rng.standard_normal(3), rng.standard_normal(3))
    x_0 = rng.standard_normal((8, 3))
    x_1 = field.flow(x_0, 0.0, 1.0)
    res = cnf.log_prob(field, x_1, divergence=div, rtol=TOL, atol=TOL)
    assert np.max(np.abs(res.log_p - field.log_prob_1(x_1))) < BOUND
    assert np.max(np.abs(res.x_0 - x_0)) < BOUND
    # eq 14 with a constant Jacobian: int_0^1 div = tr A exactly.
    np.testing.assert_allclose(res.divergence_integral, np.trace(field.A), rtol=1e-9)


def test_affine_field_flow_is_exact():
    # The ground truth itself: psi is a flow (composition) and solves eq 10.
    rng = np.random.default_rng(6)
    field = checks.AffineField(rng.standard_normal((2, 2)), rng.standard_normal(2), rng.standard_normal(2))
    x = rng.standard_normal((4, 2))
    np.testing.assert_allclose(field.flow(field.flow(x, 0.0, 0.3), 0.3, 1.0), field.flow(x, 0.0, 1.0), rtol=1e-12)
    h = 1e-6
    fd = (field.flow(x, 0.4, 0.4 + h) - field.flow(x, 0.4, 0.4 - h)) / (2 * h)
    np.testing.assert_allclose(fd, field(0.4, x), rtol=1e-7, atol=1e-8)


def test_time_reversed_is_wrong():
    field = checks.DiagonalField(np.array([0.5, -0.8]), np.array([-1.0, 1.5]))
    x_1 = field.flow(np.random.default_rng(1).standard_normal((6, 2)), 0.0, 1.0)
    x_end, delta, _ = cnf.log_density_change(field, x_1, 0.0, 1.0, rtol=TOL, atol=TOL)
    wrong = cnf.standard_normal_log_prob(x_end) + delta
    right = cnf.log_prob(field, x_1, rtol=TOL, atol=TOL).log_p
    truth = field.log_prob_1(x_1)
    assert np.max(np.abs(right - truth)) < BOUND
    assert np.max(np.abs(wrong - truth)) > 0.1


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_fixed_step_order_of_log_p(method, order):
    # The log-density error of a fixed-step method falls at the method's order.
    field = checks.DiagonalField(np.array([0.5, -0.8, 0.2]), np.array([-1.0, 0.6, 1.5]))
    x_1 = field.flow(np.random.default_rng(2).standard_normal((6, 3)), 0.0, 1.0)
    truth = field.log_prob_1(x_1)
    steps = (16, 32, 64, 128)
    errors = [np.max(np.abs(cnf.log_prob(field, x_1, method=method, n_steps=k).log_p - truth)) for k in steps]
    slope = np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3


@settings(max_examples=15, deadline=None)
@given(
    c0=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=3),
    c1=st.floats(-1.5, 1.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_diagonal_fields_property(c0, c1, seed):
    c0 = np.array(c0)
    field = checks.DiagonalField(c0, np.full(c0.size, c1))
    x_1 = np.random.default_rng(seed).standard_normal((3, c0.size))
    res = cnf.log_prob(field, x_1, rtol=TOL, atol=TOL)
    assert np.max(np.abs(res.log_p - field.log_prob_1(x_1))) < BOUND


# --------------------------------------------------------------------------
# Divergence modes and the MLP
# --------------------------------------------------------------------------


def test_mlp_divergence_modes_agree(mlp_and_params, x2):
    mlp, params = mlp_and_params
    field = cnf.mlp_field(mlp, params)
    exact = cnf.log_prob(field, x2, rtol=TOL, atol=TOL)
    assert exact.divergence == "exact"
    by_autograd = cnf.log_prob(field, x2, divergence="autograd", rtol=TOL, atol=TOL)
    assert np.max(np.abs(exact.log_p - by_autograd.log_p)) < BOUND
    # The divergence kernel against autograd's trace at one time.
    np.testing.assert_allclose(field.divergence(0.3, x2), autodiff.divergence(lambda z: field(0.3, z), x2),
                               rtol=1e-10, atol=1e-12)


def test_plain_callables_choose_their_divergence(mlp_and_params, x2):
    mlp, params = mlp_and_params

    def traceable(t, x):
        return anp.tanh(x) * (1.0 + t)

    assert cnf.log_prob(traceable, x2).divergence == "autograd"
    plain = mlp.field(params)  # plain NumPy: autograd cannot trace it
    with pytest.raises(TypeError, match="rng"):
        cnf.log_prob(plain, x2)
    res = cnf.log_prob(plain, x2, rng=0, n_probes=16, method="rk4", n_steps=20)
    assert res.divergence == "hutchinson-fd"
    # Same probes (same seed) through autograd VJPs: the same estimate up to
    # the central difference's O(h^2).
    ref = cnf.log_prob(cnf.mlp_field(mlp, params), x2, divergence="hutchinson", rng=0, n_probes=16,
                       method="rk4", n_steps=20)
    assert ref.divergence == "hutchinson"
    np.testing.assert_allclose(res.log_p, ref.log_p, atol=1e-7)
    exact = cnf.log_prob(cnf.mlp_field(mlp, params), x2, method="rk4", n_steps=20)
    assert np.all(np.abs(ref.log_p - exact.log_p) < 5 * ref.log_p_stderr + 1e-12)


def test_nfe_and_method_reported():
    field = checks.DiagonalField(np.array([0.3]), np.array([0.1]))
    res = cnf.log_prob(field, np.ones((2, 1)), method="rk4", n_steps=10)
    assert (res.nfe, res.method, res.n_steps) == (40, "rk4", 10)
    res = cnf.log_prob(field, np.ones((2, 1)))
    assert res.method == "DOP853" and res.n_steps is None and res.nfe > 0


def test_continuous_limit_mlp(mlp_and_params, x2):
    mlp, params = mlp_and_params
    result = cnf.continuous_limit(cnf.mlp_field(mlp, params), x2, (8, 16, 32, 64))
    assert abs(result.slope - 1.0) < 0.3
    assert np.all(np.diff(result.errors) < 0)


def test_euler_flow_matches_solver_and_autograd_logdet(mlp_and_params, x2):
    from refflow import solvers

    mlp, params = mlp_and_params
    field = cnf.mlp_field(mlp, params)
    euler = cnf.euler_flow_log_prob(field, x2, 5)
    # The same points as Algorithm 2 ...
    np.testing.assert_allclose(euler.x_1, solvers.integrate(field, x2, method="euler", n_steps=5).x, rtol=1e-13)
    # ... and the log-det of the whole map by autograd (eq 4-5: the layers' log-dets add).
    def whole(z):
        for k in range(5):
            z = z + 0.2 * field(0.2 * k, z)
        return z

    J = autodiff.jacobian_pointwise(whole, x2)
    np.testing.assert_allclose(euler.log_det, np.linalg.slogdet(J)[1], rtol=1e-10, atol=1e-12)


def test_euler_flow_linear_exact():
    # For u = a x (scalar a) every step multiplies by (1 + a/K): log det = K d log(1 + a/K).
    a, K = -0.7, 7
    x_0 = np.random.default_rng(4).standard_normal((3, 2))
    euler = cnf.euler_flow_log_prob(lambda t, x: a * x, x_0, K)
    np.testing.assert_allclose(euler.x_1, (1 + a / K) ** K * x_0, rtol=1e-13)
    np.testing.assert_allclose(euler.log_det, K * 2 * np.log(1 + a / K), rtol=1e-13)


def test_euler_flow_not_invertible():
    # delta * Lip(u) = 1.5 > 1 (eq 6): x -> -0.5 x reverses orientation in 1-D.
    with pytest.raises(ValueError, match="n_steps"):
        cnf.euler_flow_log_prob(lambda t, x: -3.0 * x, np.ones((2, 1)), 2)


# --------------------------------------------------------------------------
# Hutchinson
# --------------------------------------------------------------------------


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_probes_fixed_along_trajectory(probe):
    # With u = (A0 + t A1) x and rk4 (exact for a divergence linear in t),
    # each probe's integral is exactly eps^T M eps with the probe drawn once:
    # rebuild the probes from the same seed.
    rng = np.random.default_rng(8)
    field = checks.TimeLinearField(rng.standard_normal((3, 3)), rng.standard_normal((3, 3)))
    x_1 = rng.standard_normal((5, 3))
    k = 4
    res = cnf.log_prob(field, x_1, divergence="hutchinson", n_probes=k, probe=probe, rng=123,
                       method="rk4", n_steps=8)
    eps = cnf._draw_probes(np.random.default_rng(123), probe, (k, 5, 3))
    expected = np.einsum("knd,de,kne->kn", eps, field.M, eps)
    integral = cnf.standard_normal_log_prob(res.x_0)[None, :] - res.log_p_probes
    np.testing.assert_allclose(integral, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(res.log_p, res.log_p_probes.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(res.log_p_stderr, res.log_p_probes.std(axis=0, ddof=1) / np.sqrt(k), rtol=1e-12)


def test_hutchinson_reproducible_and_single_probe():
    field = checks.TimeLinearField(np.eye(2), np.ones((2, 2)))
    x = np.ones((3, 2))
    a = cnf.log_prob(field, x, divergence="hutchinson", rng=9, n_probes=3, method="rk4", n_steps=4)
    b = cnf.log_prob(field, x, divergence="hutchinson", rng=9, n_probes=3, method="rk4", n_steps=4)
    np.testing.assert_array_equal(a.log_p, b.log_p)
    one = cnf.log_prob(field, x, divergence="hutchinson", rng=9, n_probes=1, method="rk4", n_steps=4)
    assert one.log_p_stderr is None and one.log_p_probes.shape == (1, 3)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_quadratic_form_moments(probe):
    # The theory used by the checks, against simulation-free identities.
    M = np.random.default_rng(1).standard_normal((3, 3))
    S = 0.5 * (M + M.T)
    mean, var, mu4 = checks.quadratic_form_moments(M, probe)
    assert mean == pytest.approx(np.trace(M), rel=1e-12)
    expected = 2 * np.sum(S**2) - (2 * np.sum(np.diag(M) ** 2) if probe == "rademacher" else 0.0)
    assert var == pytest.approx(expected, rel=1e-12)
    assert mu4 >= var**2


def test_hutchinson_divergence_pointwise(mixture):
    field = cnf.marginal_field(mixture.marginal(OTPath()))
    x = mixture.sample(3, 4)
    x_rep = np.repeat(x, 500, axis=0)
    est, se, samples = cnf.hutchinson_divergence(field, 0.5, x_rep, 5, n_probes=4, probe="gaussian")
    pooled = samples.reshape(4, 3, 500).transpose(1, 0, 2).reshape(3, -1)
    J = autodiff.jacobian_pointwise(lambda z: field(0.5, z), x)
    exact = field.divergence(0.5, x)
    for i in range(3):
        _, var, _ = checks.quadratic_form_moments(J[i], "gaussian")
        assert abs(pooled[i].mean() - exact[i]) < 4.5 * np.sqrt(var / pooled[i].size)
    assert est.shape == se.shape == (1500,)


# --------------------------------------------------------------------------
# Forward direction and round trip
# --------------------------------------------------------------------------


def test_round_trip_mlp(mlp_and_params):
    mlp, params = mlp_and_params
    field = cnf.mlp_field(mlp, params)
    fwd = cnf.sample_with_log_prob(field, 12, 2, 0, rtol=TOL, atol=TOL)
    bwd = cnf.log_prob(field, fwd.x_1, rtol=TOL, atol=TOL)
    assert np.max(np.abs(fwd.log_p - bwd.log_p)) < BOUND
    assert np.max(np.abs(fwd.x_0 - bwd.x_0)) < BOUND
    np.testing.assert_allclose(fwd.divergence_integral, bwd.divergence_integral, atol=BOUND)
    # x_0 are the N(0, I) draws of the rng.
    np.testing.assert_array_equal(fwd.x_0, np.random.default_rng(0).standard_normal((12, 2)))


def test_sample_uses_marginal_base():
    # With a marginal field, x_0 is drawn from the marginal's own p_0 (VE: wide).
    target = targets.single_gaussian([1.0, -1.0], np.diag([0.2, 0.5]))
    field = cnf.marginal_field(target.marginal(VEPath(0.01, 5.0)))
    res = cnf.sample_with_log_prob(field, 400, 2, 1, rtol=1e-8, atol=1e-8)
    assert res.x_0.std() > 3.0
    truth = field.marginal.log_prob(res.x_1, 1.0)
    assert np.max(np.abs(res.log_p - truth)) < 1e-4


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


def _lin(t, x):
    return -x


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"method": "nope"}, ValueError, "method"),
        ({"method": 3}, TypeError, "method"),
        ({"divergence": "nope"}, ValueError, "divergence"),
        ({"divergence": 3}, TypeError, "divergence"),
        ({"divergence": "hutchinson", "n_probes": 0, "rng": 0}, ValueError, "n_probes"),
        ({"divergence": "hutchinson", "n_probes": 1.5, "rng": 0}, TypeError, "n_probes"),
        ({"divergence": "hutchinson", "probe": "uniform", "rng": 0}, ValueError, "probe"),
        ({"divergence": "hutchinson"}, TypeError, "rng"),
        ({"divergence": "exact"}, ValueError, "divergence"),
        ({"divergence": "autograd", "n_probes": 3}, ValueError, "n_probes"),
        ({"n_steps": 0, "method": "rk4"}, ValueError, "n_steps"),
        ({"rtol": -1.0}, ValueError, "rtol"),
        ({"base_log_prob": 3}, TypeError, "base_log_prob"),
        ({"base_log_prob": lambda x: np.zeros(1)}, ValueError, "base_log_prob"),
        ({"divergence": lambda t, x: np.zeros((x.shape[0], 1))}, ValueError, "divergence"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cnf.log_prob(_lin, np.ones((3, 2)), **kwargs)


def test_bad_points_and_fields():
    with pytest.raises(ValueError, match="x_1"):
        cnf.log_prob(_lin, np.ones(3))
    with pytest.raises(ValueError, match="x_1"):
        cnf.log_prob(_lin, np.array([[np.nan, 1.0]]))
    with pytest.raises(TypeError, match="field"):
        cnf.log_prob("not a field", np.ones((2, 2)))
    with pytest.raises(ValueError, match="field"):
        cnf.log_prob(lambda t, x: x[:, :1], np.ones((2, 2)), divergence=lambda t, x: np.zeros(2))
    with pytest.raises(TypeError, match="autograd"):
        cnf.log_prob(lambda t, x: np.asarray(x) * 0 + 1.0, np.ones((2, 2)), divergence="autograd")
    with pytest.raises(TypeError, match="rng"):
        cnf.sample_with_log_prob(_lin, 2, 2, None)
    with pytest.raises(ValueError, match="n"):
        cnf.sample_with_log_prob(_lin, 0, 2, 0)
    with pytest.raises(ValueError, match="n_steps"):
        cnf.continuous_limit(_lin, np.ones((2, 2)), (8,))
    with pytest.raises(TypeError, match="mlp"):
        cnf.mlp_field(object(), None)
    with pytest.raises(TypeError, match="marginal"):
        cnf.marginal_field(object())


# --------------------------------------------------------------------------
# Registered checks: each passes and its negative control is caught
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "cnf.closed_form_likelihood", "cnf.linear_pushforward", "cnf.hutchinson", "cnf.round_trip",
    "cnf.continuous_limit",
])
def test_registered_check(name):
    (entry,) = [e for e in registered() if e.name == name]
    result = run_check(entry, quick=True)
    assert result.passed, (result.message, result.error, result.tolerance, result.control_error)
    assert result.control_caught


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, mlp_and_params):
    from refflow import train

    mlp, params = mlp_and_params
    folder = tmp_path_factory.mktemp("likelihood")
    state = train.train(mlp, targets.eight_gaussians(), OTPath(), steps=0, rng=0, params=params)
    model_file = folder / "model.npz"
    train.save_checkpoint(model_file, state, mlp, OTPath(), extra={"target": "eight-gaussians"})
    points = np.random.default_rng(0).standard_normal((7, 2))
    np.savez(folder / "points.npz", points)
    return folder, model_file, points, mlp, params


def test_cli_likelihood(checkpoint, capsys):
    from refflow.cli import main

    folder, model_file, points, mlp, params = checkpoint
    out = folder / "logp.npz"
    plot = folder / "density.png"
    rc = main(["likelihood", str(model_file), "--points", str(folder / "points.npz"), "--out", str(out),
               "--rtol", "1e-9", "--atol", "1e-9", "--plot", str(plot), "--grid", "12"])
    assert rc == 0
    with np.load(out) as data:
        ref = cnf.log_prob(cnf.mlp_field(mlp, params), points, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(data["log_p"], ref.log_p, rtol=1e-12)
        np.testing.assert_allclose(data["x_0"], ref.x_0, rtol=1e-12)
    assert plot.stat().st_size > 1000
    assert not [f for f in os.listdir(folder) if f.startswith(".tmp-")]


def test_cli_hutchinson(checkpoint):
    from refflow.cli import main

    folder, model_file, points, _, _ = checkpoint
    out = folder / "logp_h.npz"
    rc = main(["likelihood", str(model_file), "--points", str(folder / "points.npz"), "--out", str(out),
               "--divergence", "hutchinson", "--n-probes", "3", "--method", "rk4", "--n-steps", "10"])
    assert rc == 0
    with np.load(out) as data:
        assert data["log_p_stderr"].shape == (7,)


@pytest.mark.parametrize("case", ["missing model", "corrupt model", "missing points", "corrupt points",
                                  "wrong columns", "bad method", "missing folder"])
def test_cli_errors(checkpoint, case, capsys):
    from refflow.cli import main

    folder, model_file, _, _, _ = checkpoint
    bad = folder / "corrupt.npz"
    bad.write_bytes(b"not an npz")
    wide = folder / "wide.npz"
    np.savez(wide, np.zeros((3, 5)))
    model, pts, out, extra = str(model_file), str(folder / "points.npz"), str(folder / f"o-{case}.npz"), []
    if case == "missing model":
        model = str(folder / "absent.npz")
    elif case == "corrupt model":
        model = str(bad)
    elif case == "missing points":
        pts = str(folder / "absent.npz")
    elif case == "corrupt points":
        pts = str(bad)
    elif case == "wrong columns":
        pts = str(wide)
    elif case == "bad method":
        extra = ["--method", "nope"]
    elif case == "missing folder":
        out = str(folder / "no-such-folder" / "o.npz")
    rc = main(["likelihood", model, "--points", pts, "--out", out, *extra])
    assert rc == 2
    assert "error" in capsys.readouterr().err
    assert not os.path.exists(out)
