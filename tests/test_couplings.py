"""Minibatch OT couplings (refflow.couplings), the coupling kind of refflow check, OT-CFM training."""
import itertools

import numpy as np
import pytest

from refflow.couplings import (
    exact_plan,
    gaussian_ot_map,
    ot_pairing,
    plan_cost,
    sinkhorn_plan,
    squared_distances,
)
from refflow.validate import check

CASE = "eight-gaussians/icfm-sigma=0.1/sigma_min=0/d=2"


def _batches(n, m, d=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), 2.0 * rng.standard_normal((m, d)) + 1.0


# --------------------------------------------------------------------------- the solvers


def test_exact_plan_is_the_best_permutation():
    x_0, x_1 = _batches(6, 6)
    cost = squared_distances(x_0, x_1)
    best = min(sum(cost[i, p[i]] for i in range(6)) for p in itertools.permutations(range(6))) / 6
    plan = exact_plan(x_0, x_1)
    assert abs(plan_cost(plan, cost) - best) <= 1e-14 * best
    assert set(np.unique(plan)) == {0.0, 1 / 6}


def test_exact_plan_unequal_sizes_matches_linprog():
    from scipy.optimize import linprog

    x_0, x_1 = _batches(12, 8)
    cost = squared_distances(x_0, x_1)
    n, m = cost.shape
    res = linprog(cost.ravel(), A_eq=np.vstack([np.kron(np.eye(n), np.ones((1, m))), np.kron(np.ones((1, n)), np.eye(m))]),
                  b_eq=np.r_[np.full(n, 1 / n), np.full(m, 1 / m)], bounds=(0, None), method="highs")
    plan = exact_plan(x_0, x_1)
    np.testing.assert_allclose(plan.sum(1), 1 / n, rtol=1e-14)
    np.testing.assert_allclose(plan.sum(0), 1 / m, rtol=1e-14)
    # HiGHS solves to its default tolerance (1e-7 relative); the replicated assignment is exact
    assert abs(plan_cost(plan, cost) - res.fun) <= 1e-7 * res.fun


def test_sinkhorn_is_of_gibbs_form_with_the_right_marginals():
    x_0, x_1 = _batches(30, 20)
    cost = squared_distances(x_0, x_1)
    reg = 0.3
    plan = sinkhorn_plan(cost=cost, reg=reg, tol=1e-13)
    np.testing.assert_allclose(plan.sum(1), 1 / 30, rtol=1e-12)
    np.testing.assert_allclose(plan.sum(0), 1 / 20, rtol=1e-12)
    # log pi + C / reg = f_i + g_j: a sum of a row and a column term (double centring leaves nothing)
    k = np.log(plan) + cost / reg
    resid = k - k.mean(1, keepdims=True) - k.mean(0, keepdims=True) + k.mean()
    assert np.abs(resid).max() < 1e-9
    other = np.log(sinkhorn_plan(cost=cost, reg=2 * reg)) + cost / reg  # control: another reg
    resid = other - other.mean(1, keepdims=True) - other.mean(0, keepdims=True) + other.mean()
    assert np.abs(resid).max() > 1.0


def test_sinkhorn_small_regularisation_stays_finite_and_warns_when_not_converged():
    x_0, x_1 = _batches(16, 16)
    cost = squared_distances(x_0, x_1)
    with pytest.warns(RuntimeWarning, match="not converged after max_iter=200"):
        plan = sinkhorn_plan(cost=cost, reg=1e-3, max_iter=200)   # exp(-C / reg) underflows; the potentials do not
    assert np.all(np.isfinite(plan)) and plan.max() > 0
    # column sums are exact after every g update, whatever the row sums, up to the rounding of
    # exponents of size max C / reg: a relative 16 u max C / reg
    np.testing.assert_allclose(plan.sum(0), 1 / 16, rtol=16 * 2.0**-53 * cost.max() / 1e-3)


def test_sinkhorn_matches_pot():
    ot = pytest.importorskip("ot")
    x_0, x_1 = _batches(40, 40)
    cost = squared_distances(x_0, x_1)
    ref = ot.sinkhorn(np.full(40, 1 / 40), np.full(40, 1 / 40), cost, 0.5, stopThr=1e-14, numItermax=100_000)
    plan = sinkhorn_plan(cost=cost, reg=0.5, tol=1e-13)
    assert np.abs(plan - ref).max() <= 1e-10 * plan.max()


def test_ot_pairing():
    x_0, x_1 = _batches(32, 32)
    j = ot_pairing(x_0, x_1)
    assert sorted(j) == list(range(32))
    np.testing.assert_array_equal(exact_plan(x_0, x_1)[np.arange(32), j], 1 / 32)
    j1 = ot_pairing(x_0, x_1, "sinkhorn", reg=0.5, rng=3)
    assert np.array_equal(j1, ot_pairing(x_0, x_1, "sinkhorn", reg=0.5, rng=3))
    with pytest.raises(ValueError, match="reg"):
        ot_pairing(x_0, x_1, "sinkhorn")
    with pytest.raises(ValueError, match="method"):
        ot_pairing(x_0, x_1, "greedy")
    with pytest.raises(ValueError, match="x_1: expected 32 rows"):
        ot_pairing(x_0, x_1[:10])


def test_gaussian_ot_map():
    rng = np.random.default_rng(5)
    B = rng.standard_normal((3, 3))
    cov_1 = B @ B.T + 0.5 * np.eye(3)
    mean_1 = np.array([1.0, -2.0, 0.5])
    A, b = gaussian_ot_map(np.zeros(3), np.eye(3), mean_1, cov_1)
    np.testing.assert_allclose(A, A.T, atol=1e-13)
    assert np.linalg.eigvalsh(A).min() > 0
    np.testing.assert_allclose(A @ np.eye(3) @ A.T, cov_1, rtol=1e-12)
    np.testing.assert_allclose(b, mean_1)
    # general source: pushes N(m0, S0) to N(m1, S1)
    C = rng.standard_normal((3, 3))
    cov_0 = C @ C.T + 0.3 * np.eye(3)
    A, b = gaussian_ot_map(np.ones(3), cov_0, mean_1, cov_1)
    np.testing.assert_allclose(A @ cov_0 @ A.T, cov_1, rtol=1e-10)
    np.testing.assert_allclose(np.ones(3) @ A.T + b, mean_1)


# --------------------------------------------------------------------------- refflow check, kind coupling


def _passes(report):
    assert report.passed, report.table()
    return report


def test_refflow_couplings_pass():
    _passes(check("coupling", lambda a, b: exact_plan(a, b), CASE))
    _passes(check("coupling", lambda a, b: exact_plan(a, b), CASE, m=48))
    _passes(check("coupling", lambda a, b: (a, b[ot_pairing(a, b)]), CASE))
    _passes(check("coupling", lambda a, b: sinkhorn_plan(a, b, 0.5), CASE, method="sinkhorn", reg=0.5))
    _passes(check("coupling", lambda a, b: exact_plan(a, b).astype(np.float32), CASE))


def _draws(plan_fn, seed=0):
    rng = np.random.default_rng(seed)

    def coupling(a, b):
        p = plan_fn(a, b).ravel()
        k = rng.choice(p.size, size=a.shape[0], p=p / p.sum())
        i, j = np.divmod(k, b.shape[0])
        return a[i], b[j]

    return coupling


def test_planted_coupling_bugs_are_named():
    cases = [
        (lambda a, b: exact_plan(a, b).T, {}, "cost", "plan_transposed"),
        (lambda a, b: exact_plan(cost=squared_distances(a, b, squared=False)), {}, "cost", "cost_unsquared"),
        (lambda a, b: sinkhorn_plan(a, b, 0.5).T, {"method": "sinkhorn", "reg": 0.5}, "plan", "plan_transposed"),
        (lambda a, b: sinkhorn_plan(cost=squared_distances(a, b, False), reg=0.5), {"method": "sinkhorn", "reg": 0.5},
         "plan", "cost_unsquared"),
        (lambda a, b: sinkhorn_plan(a, b, 1.0), {"method": "sinkhorn", "reg": 0.5}, "plan", "regularisation_scaled"),
        (_draws(lambda a, b: exact_plan(a, b).T), {}, "support", "plan_transposed"),
        (_draws(lambda a, b: exact_plan(cost=squared_distances(a, b, False))), {}, "support", "cost_unsquared"),
        (_draws(lambda a, b: sinkhorn_plan(a, b, 1.0)), {"method": "sinkhorn", "reg": 0.5}, "expected_cost",
         "regularisation_scaled"),
    ]
    for fn, options, prop, cause in cases:
        report = check("coupling", fn, CASE, **options)
        assert not report.passed and report[prop].causes[:1] == [cause], report.table()
    report = check("coupling", lambda a, b: exact_plan(a, b).T, CASE, m=48)   # (m, n) for (n, m)
    assert report["plan_shape"].causes == ["plan_transposed"]
    report = check("coupling", lambda a, b: (a + 1e-3, b), CASE)
    assert report["pairs_from_batch"].causes == ["pairs_not_from_batch"]
    with pytest.warns(RuntimeWarning, match="not converged"):   # a solver stopped early
        report = check("coupling", lambda a, b: sinkhorn_plan(a, b, 0.5, max_iter=3), CASE, method="sinkhorn",
                       reg=0.5)
    assert report["marginals"].causes == ["marginals_broken"], report.table()


def test_coupling_check_refuses_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        check("coupling", exact_plan, CASE, method="greedy")
    with pytest.raises(ValueError, match="reg: expected the entropic"):
        check("coupling", exact_plan, CASE, method="sinkhorn")
    with pytest.raises(ValueError, match="reg: expected None"):
        check("coupling", exact_plan, CASE, reg=0.1)
    with pytest.raises(ValueError, match="does not support kind 'coupling'"):
        check("coupling", exact_plan, "eight-gaussians/ot/sigma_min=0/d=2")


def _torch():
    return pytest.importorskip("torch")


def test_torchcfm_ot_samplers_pass():
    torch = _torch()
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    np.random.seed(0)  # TorchCFM's sample_map draws from NumPy's global generator
    f32 = lambda a: torch.from_numpy(a).float()  # noqa: E731
    for matcher in (cfm.ExactOptimalTransportConditionalFlowMatcher(sigma=0.1),
                    cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=0.5)):   # SB: exact OT by default
        sampler = matcher.ot_sampler
        _passes(check("coupling", lambda a, b: sampler.get_map(f32(a), f32(b)), CASE))
        _passes(check("coupling", lambda a, b: sampler.get_map(f32(a), f32(b)), CASE, m=48))
        _passes(check("coupling", lambda a, b: sampler.sample_plan(f32(a), f32(b)), CASE))
    sb = cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=0.5, ot_method="sinkhorn")  # reg = 2 sigma^2
    sampler = sb.ot_sampler
    for dtype in (torch.float32, torch.float64):
        to = lambda a: torch.from_numpy(a).to(dtype)  # noqa: E731
        _passes(check("coupling", lambda a, b: sampler.get_map(to(a), to(b)), CASE, method="sinkhorn", reg=0.5))
        _passes(check("coupling", lambda a, b: sampler.sample_plan(to(a), to(b)), CASE, method="sinkhorn", reg=0.5))
    # the same sampler judged at the wrong regularisation
    report = check("coupling", lambda a, b: sampler.get_map(to(a), to(b)), CASE, method="sinkhorn", reg=0.25)
    assert report["plan"].causes[:1] == ["regularisation_scaled"], report.table()


# --------------------------------------------------------------------------- OT-CFM training


def test_train_with_an_exact_coupling_runs_and_refuses_bad_couplings():
    from refflow.nn import MLP
    from refflow.paths import OTPath
    from refflow.targets import eight_gaussians
    from refflow.train import train

    model = MLP(2, (16,), "silu")
    seen = []

    def spy(x_0, x_1, rng):
        j = ot_pairing(x_0, x_1)
        # the OT pairing never costs more than the pairing as drawn
        seen.append(np.mean(np.sum((x_0 - x_1[j]) ** 2, 1)) <= np.mean(np.sum((x_0 - x_1) ** 2, 1)))
        return j

    state = train(model, eight_gaussians(), OTPath(), steps=3, batch_size=32, rng=0, coupling=spy)
    assert state.step == 3 and all(seen)
    a = train(model, eight_gaussians(), OTPath(), steps=3, batch_size=32, rng=0, coupling="exact")
    assert np.all(np.isfinite(a.params))
    with pytest.raises(ValueError, match="coupling: expected"):
        train(model, eight_gaussians(), OTPath(), steps=1, batch_size=8, rng=0, coupling="sinkhorn")


def test_check_command_coupling(tmp_path, monkeypatch, capsys):
    from refflow import cli

    (tmp_path / "my_ot.py").write_text(
        "from refflow.couplings import exact_plan\n"
        "def plan(x_0, x_1):\n    return exact_plan(x_0, x_1)\n"
        "def transposed(x_0, x_1):\n    return exact_plan(x_0, x_1).T\n")
    monkeypatch.chdir(tmp_path)
    args = ["check", "--kind", "coupling", "--case", CASE, "--timeout", "0"]
    assert cli.main(args + ["--impl", "my_ot.py:plan"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert cli.main(args + ["--impl", "my_ot.py:transposed"]) == 1
    assert "plan transposed" in capsys.readouterr().out
    assert cli.main(args + ["--impl", "my_ot.py:plan", "--method", "sinkhorn"]) == 2
    assert "reg: expected the entropic" in capsys.readouterr().err
    assert cli.main(["check", "--kind", "path", "--reg", "0.1", "--impl", "my_ot.py:plan", "--case", CASE]) == 2
    assert "--reg: applies only to --kind coupling" in capsys.readouterr().err
    assert cli.main(["check", "--list"]) == 0
    assert CASE in capsys.readouterr().out
