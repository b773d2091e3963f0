r"""kind = "sampler": a sampler ``(n, seed) -> x`` against exact draws of :math:`p_1` (two-sample tests)."""
from __future__ import annotations

import math

import numpy as np

from refflow.solvers import integrate
from refflow.stats import EXACT_TOL, FAMILY_ALPHA, bonferroni_z, energy_distance_test
from refflow._validation import check_scalar
from refflow.validate.calling import Caller, resolve_impl
from refflow.validate.catalog import get_case, require_kind
from refflow.validate.errors import row_error
from refflow.validate.report import CheckReport, PropertyResult

__all__ = ["check_sampler"]

# Relabellings of the energy test: memory grows like (2 n_energy) x permutations.
_MAX_PERMUTATIONS = 29999


def check_sampler(impl, case, *, threshold=None, n: int = 2000, seed=0, n_reference: int = 20000,
                  n_energy: int = 500, max_gap=None, max_energy=None, max_weight_error=None) -> CheckReport:
    r"""Check a sampler ``impl(n, seed) -> x`` of shape ``(n, d)`` against exact draws of :math:`p_1`.

    ``seed`` is a Python int; the same seed must give the same samples.

    Two settings.  An *exact* sampler (the default) is held to two-sample
    tests that any difference from :math:`p_1` fails, given enough samples.
    A *trained* model always differs a little, so give one of ``max_gap``,
    ``max_energy``, ``max_weight_error``: the check then judges effect sizes
    in their own units, and the three tests are reported only.

    Effect sizes (reported always; judged when their bound is given)
    ---------------------------------------------------------------
    ``log_lik_gap``
        :math:`\Delta = \overline{\log p_1(Y)} - \overline{\log p_1(X)}` in
        nats (Y exact draws, X the samples), with its standard error and 95 %
        interval; judged by :math:`|\Delta| \le` ``max_gap``.  Positive:
        the samples sit where :math:`p_1` is lower (blurred or misplaced
        modes); negative: too concentrated (modes too sharp).
    ``energy_distance``
        The energy statistic of the ``energy`` test (units of x), beside the
        level it reaches on exact samples (its permutation critical value);
        judged by ``<= max_energy``.
    ``weights``
        Per-component weights :math:`\hat w_k = \overline{r_k(X)}`, the mean
        posterior responsibility of component k at t = 1 (for exact samples
        :math:`E\,r_k(X) = w_k`), against :math:`w_k`; the error is
        :math:`\max_k |\hat w_k - w_k|`, judged by ``<= max_weight_error``.

    Properties (family-wise false-alarm rate ``alpha = threshold`` or ``1e-3``,
    split equally between the three tests, Bonferroni)
    ----------
    ``seeded``
        Two calls with the same seed return the same samples.
    ``mean_log_prob``
        z-test of :math:`\overline{\log p_1(X)}` (the user's samples, exact
        log-density of eq 16) against the mean over ``n_reference`` exact
        draws: :math:`z = \Delta / \sqrt{s_X^2/n + s_Y^2/m}`.
    ``energy``
        Energy distance between ``n_energy`` of the samples and as many exact
        draws, against its permutation critical value
        (:func:`energy_distance_test` with :math:`3/\alpha - 1` relabellings).
    ``moments``
        Largest |z| of the differences of the means and second moments
        :math:`E[x_i x_j]` from the exact draws; Bonferroni over the
        :math:`d + d(d+1)/2` statistics.
    """
    fn, impl_name = resolve_impl(impl)
    case = get_case(case)
    require_kind(case, "sampler")
    n = check_scalar(n, "n", low=16, integer=True)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an int (it is passed to the sampler), got {type(seed).__name__}")
    seed = int(seed)
    alpha = FAMILY_ALPHA if threshold is None else check_scalar(threshold, "threshold", low=0.0, high=1.0,
                                                                 low_open=True, high_open=True)
    if alpha < 3.0 / (_MAX_PERMUTATIONS + 1):
        raise ValueError(
            f"threshold: expected a sampler false-alarm rate >= {3.0 / (_MAX_PERMUTATIONS + 1):.2g} "
            f"(the permutation test needs 3/threshold relabellings, at most {_MAX_PERMUTATIONS}), got {alpha!r}"
        )
    bounds = {}
    for name, value in (("max_gap", max_gap), ("max_energy", max_energy), ("max_weight_error", max_weight_error)):
        if value is not None:
            bounds[name] = check_scalar(value, name, low=0.0)
    trained = bool(bounds)
    d = case.dim
    caller = Caller(fn, "sampler(n, seed)", ("n", "seed"))

    def draw(k):
        return caller.output(caller(k, seed), f"the samples (sampler({k}, seed))", (k, d))

    a, b = draw(16), draw(16)
    seed_err = float(np.max(row_error(b, a)))
    p_seed = PropertyResult("seeded", "two calls sampler(16, seed) with the same seed agree", seed_err,
                            EXACT_TOL, bool(seed_err <= EXACT_TOL), [] if seed_err <= EXACT_TOL else ["seed_ignored"])
    X = draw(n)
    if not np.all(np.isfinite(X)):
        bad = PropertyResult("finite", "all samples finite", np.inf, 0.0, False, ["nonfinite"])
        return CheckReport("sampler", case.name, impl_name, [p_seed, bad], {"n": n, "seed": seed})
    ref_rng = np.random.default_rng([seed, 0x5EED])
    Y = case.marginal.sample(n_reference, 1.0, ref_rng)
    per_test = alpha / 3.0
    z_tol = bonferroni_z(1, per_test)

    lx, ly = case.marginal.log_prob(X, 1.0), case.marginal.log_prob(Y, 1.0)
    se = math.sqrt(lx.var(ddof=1) / lx.size + ly.var(ddof=1) / ly.size)
    z_lp = float((lx.mean() - ly.mean()) / se)
    ne = min(n_energy, n)
    n_perm = int(math.ceil(1.0 / per_test)) - 1
    stat, crit = energy_distance_test(X[:ne], Y[:ne], n_perm, np.random.default_rng([seed, 0xE0]))
    moments_z, n_stats, spread = _moment_z(X, Y)
    m_tol = bonferroni_z(n_stats, per_test)

    gap = float(ly.mean() - lx.mean())
    w_ref = case.target.weights
    resp = case.marginal.responsibilities(X, 1.0)
    w_hat = resp.mean(axis=0)
    w_se = resp.std(axis=0, ddof=1) / math.sqrt(n)
    w_err = float(np.max(np.abs(w_hat - w_ref)))
    worst_k = int(np.argmax(np.abs(w_hat - w_ref)))

    failing = {
        "mean_log_prob": abs(z_lp) > z_tol, "energy": stat > crit, "moments": moments_z > m_tol,
        "log_lik_gap": "max_gap" in bounds and abs(gap) > bounds["max_gap"],
        "energy_distance": "max_energy" in bounds and stat > bounds["max_energy"],
        "weights": "max_weight_error" in bounds and w_err > bounds["max_weight_error"],
    }
    judged_fail = any(v for k, v in failing.items() if trained != (k in ("mean_log_prob", "energy", "moments")))
    causes_all = []
    if judged_fail:
        causes_all = _sampler_causes(case, X, Y[ne:2 * ne] if Y.shape[0] >= 2 * ne else Y[:ne], ne, seed)

    def judged(name, error, tol, compared, details=None, exact=True, note=""):
        is_judged = (exact and not trained) or (not exact and tol is not None)
        fails = failing[name] and is_judged
        if not is_judged and not note:
            note = ("reported only: a trained model is judged by its effect sizes" if exact
                    else "reported only: give its bound to judge it")
        return PropertyResult(name, compared, error, tol, bool(not fails) if is_judged else None,
                              causes_all if fails else [], details or {}, note)

    props = [
        p_seed,
        judged("mean_log_prob", abs(z_lp), z_tol,
               f"z of mean exact log p_1 of {n} samples vs {n_reference} exact draws (eq 16)",
               {"z": z_lp, "mean_log_prob": float(lx.mean()), "reference": float(ly.mean())}),
        judged("energy", stat, crit,
               f"energy distance of {ne} samples vs {ne} exact draws; tolerance: "
               f"largest of {n_perm} permuted statistics (level {per_test:.2g})"),
        judged("moments", moments_z, m_tol,
               f"max |z| of the {n_stats} means and second moments vs exact draws (Bonferroni)",
               {"covariance_trace_ratio": spread}),
        judged("log_lik_gap", abs(gap), bounds.get("max_gap"),
               f"|mean log p_1(exact draws) - mean log p_1(samples)| in nats (eq 16); "
               f"gap {gap:+.4f}, 95% interval [{gap - 1.96 * se:+.4f}, {gap + 1.96 * se:+.4f}]",
               {"gap": gap, "stderr": se, "ci95": [gap - 1.96 * se, gap + 1.96 * se]}, exact=False),
        judged("energy_distance", stat, bounds.get("max_energy"),
               f"energy distance of {ne} samples vs {ne} exact draws (units of x); exact samples reach "
               f"{crit:.3g} at level {per_test:.2g}",
               {"null_critical": crit, "n_energy": ne}, exact=False),
        judged("weights", w_err, bounds.get("max_weight_error"),
               f"max_k |w_k(samples) - w_k| over the {w_ref.size} components, w_k(samples) the mean "
               f"responsibility; worst: component {worst_k}, {w_hat[worst_k]:.4f} vs {w_ref[worst_k]:.4f}",
               {"weights": w_hat, "reference": w_ref, "weight_stderr": w_se, "worst_component": worst_k}, exact=False),
    ]
    settings = {"n": n, "seed": seed, "alpha": alpha, "n_reference": n_reference}
    settings.update(bounds)
    return CheckReport("sampler", case.name, impl_name, props, settings)


def _moment_z(X, Y):
    d = X.shape[1]
    iu = np.triu_indices(d)

    def feats(A):
        return np.concatenate([A, (A[:, :, None] * A[:, None, :])[:, iu[0], iu[1]]], axis=1)

    fx, fy = feats(X), feats(Y)
    se = np.sqrt(fx.var(axis=0, ddof=1) / fx.shape[0] + fy.var(axis=0, ddof=1) / fy.shape[0])
    z = np.abs(fx.mean(axis=0) - fy.mean(axis=0)) / np.maximum(se, np.finfo(float).tiny)
    spread = float(np.trace(np.cov(X.T).reshape(d, d)) / np.trace(np.cov(Y.T).reshape(d, d)))
    return float(z.max()), z.size, spread


def _sampler_causes(case, X, Y_fresh, ne, seed):
    """Name the variants whose samples the user's samples are indistinguishable from.

    Nothing is named for a sampler that matches no variant: the ordinary
    error of a trained model is not a "cause".
    """
    rng = np.random.default_rng([seed, 0xBAD])
    z = rng.standard_normal((ne, case.dim))
    variants = {
        "source_noise": lambda: z,
        "time_reversed": lambda: integrate(case.marginal.field(), z, 1.0, 0.0, method="rk4", n_steps=50).x,
    }
    # a classification, not the test of the user: a level of 1e-3 is enough here
    n_perm = 999
    found = []
    for key, make in variants.items():
        V = make()
        stat, crit = energy_distance_test(X[:ne], V, n_perm, rng)
        if stat <= crit:
            # indistinguishable from the variant; make sure the variant is not the truth itself
            s_true, c_true = energy_distance_test(Y_fresh, V, n_perm, rng)
            if s_true > c_true:
                found.append(key)
    if not found and _source_scaled(case, X[:ne], rng):
        found.append("wrong_spread")
    return found


def _source_scaled(case, X, rng) -> bool:
    r"""Whether ``X`` is the exact flow of :math:`\mathcal N(0, c^2 I)` noise with :math:`c \ne 1`.

    ``X`` is pulled back to t = 0 along the exact field (eq 10); if those
    points, divided by their RMS c, are indistinguishable from
    :math:`\mathcal N(0, I)` (energy test, level 1e-3) while c differs from 1
    by more than 4 standard errors (:math:`c / \sqrt{2 n d}`), the samples'
    only fault is the scale of their source noise.
    """
    with np.errstate(all="ignore"):
        x_0 = integrate(case.marginal.field(), X, 1.0, 0.0, method="DOP853", rtol=1e-6, atol=1e-6).x
    if not np.all(np.isfinite(x_0)):
        return False
    c = float(np.sqrt(np.mean(x_0**2)))
    if not abs(c - 1.0) > 4.0 * c / math.sqrt(2.0 * x_0.size):
        return False
    stat, crit = energy_distance_test(x_0 / c, rng.standard_normal(x_0.shape), 999, rng)
    return bool(stat <= crit)


# ---------------------------------------------------------------------------
# kind = "guided"
# ---------------------------------------------------------------------------

GUIDANCE_WEIGHTS = (0.0, 1.0, 2.5)
