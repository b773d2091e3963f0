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
                  n_energy: int = 500) -> CheckReport:
    r"""Check a sampler ``impl(n, seed) -> x`` of shape ``(n, d)`` against exact draws of :math:`p_1`.

    ``seed`` is a Python int; the same seed must give the same samples.

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

    causes_all = []
    if abs(z_lp) > z_tol or stat > crit or moments_z > m_tol:
        causes_all = _sampler_causes(case, X, Y[ne:2 * ne] if Y.shape[0] >= 2 * ne else Y[:ne], ne,
                                     per_test, seed, spread, moments_z > m_tol)
    props = [
        p_seed,
        PropertyResult("mean_log_prob",
                       f"z of mean exact log p_1 of {n} samples vs {n_reference} exact draws (eq 16)",
                       abs(z_lp), z_tol, bool(abs(z_lp) <= z_tol), causes_all if abs(z_lp) > z_tol else [],
                       {"z": z_lp, "mean_log_prob": float(lx.mean()), "reference": float(ly.mean())}),
        PropertyResult("energy",
                       f"energy distance of {ne} samples vs {ne} exact draws; tolerance: "
                       f"largest of {n_perm} permuted statistics (level {per_test:.2g})",
                       stat, crit, bool(stat <= crit), causes_all if stat > crit else []),
        PropertyResult("moments",
                       f"max |z| of the {n_stats} means and second moments vs exact draws (Bonferroni)",
                       moments_z, m_tol, bool(moments_z <= m_tol), causes_all if moments_z > m_tol else [],
                       {"covariance_trace_ratio": spread}),
    ]
    return CheckReport("sampler", case.name, impl_name, props,
                       {"n": n, "seed": seed, "alpha": alpha, "n_reference": n_reference})


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


def _sampler_causes(case, X, Y_fresh, ne, per_test, seed, spread, moments_failed):
    """Name the variants whose samples the user's samples are indistinguishable from."""
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
    if not found and moments_failed and abs(spread - 1.0) > 0.05:
        found.append("wrong_spread")
    return found


# ---------------------------------------------------------------------------
# kind = "guided"
# ---------------------------------------------------------------------------

GUIDANCE_WEIGHTS = (0.0, 1.0, 2.5)
