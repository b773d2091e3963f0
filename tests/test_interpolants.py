"""Two-sided interpolants (refflow.interpolants) and their path check (refflow check, interpolant cases)."""
import warnings

import numpy as np
import pytest
from autograd import elementwise_grad

from refflow.interpolants import BrownianBridgeInterpolant, ICFMInterpolant, make_interpolant
from refflow.targets import eight_gaussians
from refflow.validate import check, get_case, interpolant_catalog

IC = "eight-gaussians/icfm-sigma=0.1/sigma_min=0/d=2"
SB = "eight-gaussians/sb-sigma=0.5/sigma_min=0/d=2"
INTERPOLANTS = [ICFMInterpolant(0.1), ICFMInterpolant(0.0), BrownianBridgeInterpolant(0.5), BrownianBridgeInterpolant(1.0)]


# --------------------------------------------------------------------------- the interpolants


@pytest.mark.parametrize("ip", INTERPOLANTS, ids=repr)
def test_schedule_derivatives_match_autograd(ip):
    t = np.random.default_rng(0).uniform(0.01, 0.99, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autograd on the constant schedules
        for f, df in ((ip._a, ip._d_a), (ip._b, ip._d_b), (ip._gamma, ip._d_gamma)):
            np.testing.assert_allclose(df(t), elementwise_grad(f)(t), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(ip._gamma_d_gamma(t), 0.5 * elementwise_grad(lambda s: ip._gamma(s) ** 2)(t),
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("ip", INTERPOLANTS, ids=repr)
def test_conditional_field_at_x_t_is_the_pair_velocity(ip):
    rng = np.random.default_rng(1)
    x_0, x_1, eps = rng.standard_normal((3, 40, 3))
    t = rng.uniform(0.01, 0.99, 40)
    x_t = ip.sample(x_0, x_1, t, eps)
    u_t = ip.pair_velocity(x_0, x_1, t, eps)
    if ip.sigma > 0:
        np.testing.assert_allclose(ip.conditional_velocity(x_t, x_0, x_1, t), u_t, rtol=1e-11, atol=1e-12)
    # d x_t / dt by central differences (h = 1e-5: truncation ~ h^2 |x'''| ~ 1e-8)
    h = 1e-5
    fd = (ip.sample(x_0, x_1, t + h, eps) - ip.sample(x_0, x_1, t - h, eps)) / (2 * h)
    np.testing.assert_allclose(fd, u_t, atol=1e-6 * np.abs(u_t).max())


def test_marginal_moments_match_samples():
    # x_t ~ N(b m_k, b^2 C_k + (a^2 + gamma^2) I) per component: the mean and covariance of the mixture
    target = eight_gaussians()
    ip = BrownianBridgeInterpolant(1.0)
    rng = np.random.default_rng(2)
    n, t = 200_000, 0.4
    x_t = ip.sample(rng.standard_normal((n, 2)), target.sample(n, rng), t, rng.standard_normal((n, 2)))
    b, s2 = t, (1 - t) ** 2 + t * (1 - t)
    w, m, C = target.weights, target.means, target.covariances
    mean1 = w @ m
    cov1 = np.einsum("k,kij->ij", w, C) + np.einsum("k,ki,kj->ij", w, m, m) - np.outer(mean1, mean1)
    cov_t = b**2 * cov1 + s2 * np.eye(2)
    z_mean = np.abs(x_t.mean(0) - b * mean1) / np.sqrt(np.diag(cov_t) / n)
    assert z_mean.max() < 4.5
    # variance of a sample variance of a (heavy-ish tailed) mixture: use the sample's fourth moment
    dev = x_t - x_t.mean(0)
    var_se = np.sqrt(((dev**2).var(0)) / n)
    assert (np.abs((dev**2).mean(0) - np.diag(cov_t)) / var_se).max() < 4.5


@pytest.mark.parametrize("ip", [ICFMInterpolant(0.1), BrownianBridgeInterpolant(0.5)], ids=repr)
def test_marginal_field_is_finite_at_both_ends(ip):
    marginal = ip.marginal(eight_gaussians())
    x = np.random.default_rng(3).standard_normal((20, 2)) * 3
    for t in (0.0, 1.0):
        out = marginal.evaluate(x, t)
        for key, value in out.items():
            assert np.all(np.isfinite(value)), (key, t)


def test_marginal_field_is_the_conditional_expectation():
    # E[(u_t - u_t(x_t)) h(x_t)] = 0 for h = 1, x: a z-test over 100k draws (the verify check does more)
    target = eight_gaussians()
    ip = BrownianBridgeInterpolant(0.5)
    marginal = ip.marginal(target)
    rng = np.random.default_rng(4)
    n = 100_000
    x_0, eps = rng.standard_normal((2, n, 2))
    x_1 = target.sample(n, rng)
    for t in (0.1, 0.5, 0.9):
        x_t = ip.sample(x_0, x_1, t, eps)
        r = ip.pair_velocity(x_0, x_1, t, eps) - marginal.velocity(x_t, t)
        for h in (np.ones((n, 1)), x_t):
            g = r[:, :, None] * h[:, None, :]
            g = g.reshape(n, -1)
            z = np.abs(g.mean(0)) / (g.std(0) / np.sqrt(n))
            assert z.max() < 4.5, (t, z)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="sigma"):
        BrownianBridgeInterpolant(0.0)
    with pytest.raises(ValueError, match="sigma"):
        ICFMInterpolant(-0.1)
    with pytest.raises(ValueError, match="name"):
        make_interpolant("vp", 0.1)
    ip = BrownianBridgeInterpolant(0.5)
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="eps"):
        ip.sample(x, x, 0.5, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="t: the Brownian bridge's gamma_t' is infinite"):
        ip.pair_velocity(x, x, np.array([0.0, 0.5, 0.5]), x)
    with pytest.raises(ValueError, match="gamma_t > 0"):
        ip.conditional_velocity(x, x, x, 0.0)


# --------------------------------------------------------------------------- refflow check, kind path


def _given(case):
    ip = get_case(case).path
    return lambda x_0, x_1, t, eps: (ip.sample(x_0, x_1, t, eps), ip.pair_velocity(x_0, x_1, t, eps))


def _own(case, seed=0, bug=None):
    ip = get_case(case).path
    rng = np.random.default_rng(seed)

    def path(x_0, x_1, t):
        eps = rng.standard_normal(x_0.shape)
        x_t = ip.sample(x_0, x_1, t, eps)
        if bug == "gamma_dropped":
            return x_t, x_1 - x_0
        if bug == "redrawn":
            return x_t, ip.pair_velocity(x_0, x_1, t, rng.standard_normal(x_0.shape))
        return x_t, ip.pair_velocity(x_0, x_1, t, eps)

    return path


def _failed_causes(report):
    return {c for p in report.failed for c in p.causes}


@pytest.mark.parametrize("case", [c.name for c in interpolant_catalog()])
def test_refflow_interpolants_pass_their_cases(case):
    assert get_case(case).kinds == ("path", "coupling")
    report = check("path", _given(case), case)
    assert report.passed and report.settings["noise"] == "given", report.table()
    report = check("path", _own(case), case)
    assert report.passed and report.settings["noise"] == "own", report.table()


def test_rounded_to_float32_passes():
    f = _given(SB)
    report = check("path", lambda *a: tuple(v.astype(np.float32) for v in f(*a)), SB)
    assert report.passed, report.table()


def test_gamma_derivative_dropped_is_named():
    ip = get_case(SB).path
    report = check("path", lambda x_0, x_1, t, eps: (ip.sample(x_0, x_1, t, eps), x_1 - x_0), SB)
    assert not report.passed
    assert report["u_t"].causes[0] == "gamma_derivative_dropped", report.table()
    report = check("path", _own(SB, bug="gamma_dropped"), SB)
    assert report["u_t_given_x_t"].causes == ["gamma_derivative_dropped"], report.table()


def test_noise_redrawn_between_x_t_and_u_t_is_named():
    ip = get_case(SB).path
    rng = np.random.default_rng(7)
    report = check("path", lambda x_0, x_1, t, eps: (ip.sample(x_0, x_1, t, eps),
                                                       ip.pair_velocity(x_0, x_1, t, rng.standard_normal(eps.shape))), SB)
    assert "noise_redrawn" in report["u_t"].causes, report.table()
    report = check("path", _own(SB, bug="redrawn"), SB)
    assert report["u_t_given_x_t"].causes == ["noise_redrawn"], report.table()


def test_noise_dropped_and_sigma_squared_are_named():
    ip = get_case(IC).path
    report = check("path", lambda x_0, x_1, t, eps: ((1 - t[:, None]) * x_0 + t[:, None] * x_1, x_1 - x_0), IC)
    assert report["x_t"].causes[:1] == ["noise_dropped"], report.table()
    report = check("path", lambda x_0, x_1, t, eps: (ip.sample(x_0, x_1, t, eps * 0.1), x_1 - x_0), IC)
    assert "sigma_squared" in report["x_t"].causes, report.table()


def test_noise_keyword_overrides_the_signature():
    report = check("path", _own(IC), IC, noise="own")
    assert report.passed
    with pytest.raises(ValueError, match="noise: expected"):
        check("path", _own(IC), IC, noise="mine")


# --------------------------------------------------------------------------- the PyTorch libraries

def _torch():
    return pytest.importorskip("torch")


def _cfm_given(matcher, dtype):
    torch = _torch()

    def path(x_0, x_1, t, eps):
        x0, x1, tt, e = (torch.from_numpy(a).to(dtype) for a in (x_0, x_1, t, eps))
        x_t = matcher.sample_xt(x0, x1, tt, e)
        return x_t, matcher.compute_conditional_flow(x0, x1, tt, x_t)

    return path


def _cfm_own(matcher, dtype):
    torch = _torch()

    def path(x_0, x_1, t):
        x0, x1, tt = (torch.from_numpy(a).to(dtype) for a in (x_0, x_1, t))
        _, x_t, u_t = matcher.sample_location_and_conditional_flow(x0, x1, tt)
        return x_t, u_t

    return path


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torchcfm_conditional_flow_matcher_sigma_passes(dtype):
    torch = _torch()
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    torch.manual_seed(0)
    matcher = cfm.ConditionalFlowMatcher(sigma=0.1)
    dt = getattr(torch, dtype)
    report = check("path", _cfm_given(matcher, dt), IC)
    assert report.passed, report.table()
    report = check("path", _cfm_own(matcher, dt), IC)  # as shipped: its own noise, judged statistically
    assert report.passed and report.settings["noise"] == "own", report.table()


def test_torchcfm_schrodinger_bridge_path():
    torch = _torch()
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    torch.manual_seed(0)
    matcher = cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=0.5)
    # its path (sample_xt, compute_conditional_flow) with refflow's noise, in float32: passes
    report = check("path", _cfm_given(matcher, torch.float32), SB)
    assert report.passed, report.table()
    # in float64 the + 1e-8 of its (1 - 2t) / (2t(1 - t) + 1e-8) is no longer below the rounding:
    # u_t is off by a relative 1e-8 / (2t(1 - t)) near both ends, and refflow names it
    report = check("path", _cfm_given(matcher, torch.float64), SB)
    assert not report.passed and report["u_t"].causes == ["denominator_regularised"], report.table()
    assert report["u_t"].details["worst_t"] < 1e-3 or report["u_t"].details["worst_t"] > 1 - 1e-3
    # as shipped, sample_location_and_conditional_flow re-pairs the batch by OT: a coupling, not a path
    report = check("path", _cfm_own(matcher, torch.float32), SB)
    assert "repairs_batch" in _failed_causes(report), report.table()


def test_torchcfm_exact_ot_matcher_is_named_a_coupling():
    torch = _torch()
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    torch.manual_seed(0)
    matcher = cfm.ExactOptimalTransportConditionalFlowMatcher(sigma=0.1)
    report = check("path", _cfm_own(matcher, torch.float32), IC)
    assert "repairs_batch" in _failed_causes(report), report.table()
    # its path part (inherited from ConditionalFlowMatcher) passes
    report = check("path", _cfm_given(matcher, torch.float32), IC)
    assert report.passed, report.table()


def test_flow_matching_affine_path_passes():
    _torch()
    fm_path = pytest.importorskip("flow_matching.path")
    sched = pytest.importorskip("flow_matching.path.scheduler")
    from refflow.adapters import flow_matching_path

    path = flow_matching_path(fm_path.AffineProbPath(scheduler=sched.CondOTScheduler()))
    report = check("path", path, "eight-gaussians/ot/sigma_min=0/d=2")
    assert report.passed, report.table()
