r"""Likely causes: the mistakes users make, and how refflow recognises them.

When a property fails, refflow computes planted wrong variants of the truth
(time reversed, :math:`\sigma_t^2` for :math:`\sigma_t`, :math:`x_0` and
:math:`x_1` swapped, ...) and names those the output matches
(:func:`match_variants`).  Some causes are found by other evidence: the
endpoints a path's output implies (:func:`implied_endpoints`: noise of its
own, a re-paired batch), two calls that disagree, inputs changed in place.
"""
from __future__ import annotations

import numpy as np

from refflow.paths import AffinePath, OTPath
from refflow.validate.errors import row_error

__all__ = [
    "CAUSES",
    "SquaredSigmaPath",
    "SwappedPath",
    "no_sigma_min",
    "pair_velocity_raw",
    "sample_raw",
    "match_variants",
    "max_row_distance",
    "l2_distance",
    "implied_endpoints",
    "endpoint_evidence",
    "ignores_x0",
]

# ---------------------------------------------------------------------------
# Likely causes
# ---------------------------------------------------------------------------

CAUSES = {
    "time_reversed": "time reversed: data at t = 0 and noise at t = 1 (for a VP schedule: "
                     "alpha_t = a(t) instead of a(1 - t), so alpha_0 = 1 instead of ~0)",
    "time_argument_reversed": "time argument reversed: the field is evaluated at 1 - t",
    "sign_flipped": "sign of the velocity flipped (e.g. OT target x_0 - x_1 instead of x_1 - x_0)",
    "sigma_squared": "sigma_t^2 used where sigma_t belongs (variance for standard deviation)",
    "x0_x1_swapped": "x_0 and x_1 swapped (noise and data exchanged in the interpolation)",
    "sigma_min_dropped": "sigma_min dropped: the output matches the sigma_min = 0 formula",
    "nearest_component": "responsibilities missing: the field of the nearest mixture component "
                         "instead of the responsibility-weighted average of eq 19",
    "precision_near_t1": "precision lost near t = 1: the error appears only where sigma_t -> 0, "
                         "a cancellation such as sigma_t'/sigma_t (x_t - alpha_t x_1) or "
                         "sqrt(1 - alpha_t^2) (float32 makes it worse); use forms that stay accurate "
                         "there (sigma_t' x_0 + alpha_t' x_1, sigma_t sigma_t', sqrt(-expm1(-T))) "
                         "or accept the loss with a threshold",
    "target_inconsistent": "u_t is not d x_t / dt of the implementation's own x_t (eq 27): "
                           "the regression target does not belong to the interpolation",
    "nonfinite": "non-finite output (NaN or inf), typically a division by sigma_t = 0 at t = 1",
    "divergence_sign": "sign of the divergence integral flipped: log p_0(x_0) + int div u dt "
                       "instead of minus (eq 14)",
    "no_divergence": "divergence term missing: only log p_0(x_0) of the transported point (eq 14)",
    "missing_normaliser": "base density normalising constant missing: -d/2 log(2 pi) dropped "
                          "from log p_0",
    "negative_log_likelihood": "returns the negative log-likelihood (loss) instead of log p_1",
    "stochastic_divergence": "non-deterministic output: a stochastic divergence estimate "
                             "(Hutchinson probe redrawn per call or per step) or unseeded randomness",
    "guidance_off_by_one": "guidance weight off by one: the other convention of eq 40 "
                           "(notes: (1 - w) u_null + w u_y; flow_matching: (1 + w) u_y - w u_null; "
                           "w_notes = 1 + w_flow_matching)",
    "guidance_swapped": "conditional and unconditional velocities swapped in eq 40",
    "null_prompt_as_class": "null prompt not honoured: label -1 treated as class 0",
    "guidance_ignored": "guidance weight ignored: the output is the conditional field for every w",
    "label_ignored": "label ignored: the output is the unconditional field for every w",
    "seed_ignored": "seed ignored: the same seed gives different samples (global random state?)",
    "source_noise": "returns the source noise: the samples are distributed as p_0 = N(0, I)",
    "wrong_spread": "wrong spread: the sample covariance differs from the target's "
                    "(base noise variance, or too few / wrong solver steps)",
    "modified_inputs": "modified its inputs: the implementation changed the arrays it was given in place "
                       "(e.g. an in-place op on torch.from_numpy(x)); refflow judged it on its own copy",
    "draws_own_noise": "draws its own noise / ignores x_0: x_t is not sigma_t x_0 + alpha_t x_1 for the x_0 "
                       "refflow passed (the implementation samples x_0 itself)",
    "nondeterministic": "not deterministic between calls: the same inputs gave different outputs "
                        "(noise redrawn on every call, or unseeded randomness)",
    "repairs_batch": "re-pairs the batch: the rows of x_0 (or x_1) are matched to other rows, as a minibatch "
                     "OT coupling does; that is a coupling, not a path (check it with kind='coupling')",
    "outputs_swapped": "outputs swapped: (u_t, x_t) returned instead of (x_t, u_t)",
    "arguments_swapped": "arguments in (x, t) order: the function expects (t, x)",
    "biased_trace_estimate": "biased stochastic divergence: the mean of repeated calls misses log p_1 by more "
                             "than the ODE error allows (a probe without E[eps eps^T] = I, e.g. uniform(-1, 1))",
    "noise_redrawn": "u_t does not belong to the returned x_t: the noise was redrawn between x_t and u_t "
                     "(or the target is computed from other draws)",
    "gamma_derivative_dropped": "gamma_t' eps missing from u_t: the target is a_t' x_0 + b_t' x_1 only, the "
                                "derivative of the noise level dropped (matters wherever gamma_t is not constant)",
    "noise_dropped": "the noise term gamma_t eps is missing from x_t (the sigma = 0 path)",
    "denominator_regularised": "a constant added to a denominator biases u_t near the ends: gamma_t'/gamma_t "
                               "computed as (1 - 2t) / (2t(1 - t) + 1e-8) (TorchCFM's SB-CFM), off by a relative "
                               "1e-8 / (2t(1 - t)); write u_t = a_t' x_0 + b_t' x_1 + gamma_t' eps instead",
    "plan_transposed": "plan transposed: pi[j, i] where pi[i, j] belongs (rows index x_0, columns x_1)",
    "cost_unsquared": "cost unsquared: the plan is optimal for |x_0 - x_1| instead of |x_0 - x_1|^2",
    "regularisation_scaled": "entropic regularisation scaled: the plan is the Sinkhorn solution at another "
                             "epsilon (e.g. 2 sigma^2 vs sigma^2, or a cost normalised by its maximum)",
    "marginals_broken": "marginals not kept: the plan's row or column sums differ from the uniform weights "
                        "(a solver stopped early, or rows dropped/duplicated by a deterministic re-pairing)",
    "pairs_not_from_batch": "the returned pairs are not rows of the batch refflow passed (noise added, "
                            "or the points were transformed)",
}
"""Keys of the likely causes a report can name, with their explanations."""


# ---------------------------------------------------------------------------


class SquaredSigmaPath(AffinePath):
    """Planted bug: sigma_t^2 where sigma_t belongs."""

    name = "sigma-squared"

    def __init__(self, base):
        self.base = base

    def _alpha(self, t):
        return self.base._alpha(t)

    def _d_alpha(self, t):
        return self.base._d_alpha(t)

    def _sigma(self, t):
        return self.base._sigma(t) ** 2

    def _d_sigma(self, t):
        return 2.0 * self.base._sigma_d_sigma(t)

    def _sigma_d_sigma(self, t):
        return self.base._sigma(t) ** 2 * 2.0 * self.base._sigma_d_sigma(t)


class SwappedPath(AffinePath):
    """Planted bug: x_0 and x_1 exchanged, x_t = alpha_t x_0 + sigma_t x_1."""

    name = "swapped"

    def __init__(self, base):
        self.base = base

    def _alpha(self, t):
        return self.base._sigma(t)

    def _d_alpha(self, t):
        return self.base._d_sigma(t)

    def _sigma(self, t):
        return self.base._alpha(t)

    def _d_sigma(self, t):
        return self.base._d_alpha(t)

    def _sigma_d_sigma(self, t):
        return self.base._alpha(t) * self.base._d_alpha(t)


def no_sigma_min(path: AffinePath):
    """The same path with sigma_min = 0, or None when it has no sigma_min > 0."""
    if isinstance(path, OTPath) and path.sigma_min > 0:
        return OTPath(0.0)
    return None


def _col(t, n):
    return np.broadcast_to(np.asarray(t, dtype=np.float64), (n,)).reshape(n, 1)


def pair_velocity_raw(path, x_0, x_1, t):
    # The private schedule, so that a variant evaluated where sigma_t' is
    # infinite gives inf (left out of the comparison) instead of raising.
    tc = _col(t, x_0.shape[0])
    with np.errstate(all="ignore"):
        return path._d_sigma(tc) * x_0 + path._d_alpha(tc) * x_1


def sample_raw(path, x_0, x_1, t):
    tc = _col(t, x_0.shape[0])
    return path._sigma(tc) * x_0 + path._alpha(tc) * x_1


# ---------------------------------------------------------------------------


def max_row_distance(scale):
    def distance(a, b):
        # rows where the variant (b) is undefined (an infinite sigma_t') are left out
        err = row_error(a, b, scale)
        ok = np.all(np.isfinite(np.asarray(b, dtype=np.float64).reshape(len(err), -1)), axis=1)
        if ok.sum() < 0.5 * ok.size:
            return np.inf
        return float(np.max(err[ok]))

    return distance


def l2_distance(truth):
    denom = float(np.sum(np.asarray(truth, dtype=np.float64) ** 2)) or np.finfo(float).tiny

    def distance(a, b):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        ok = np.all(np.isfinite(b.reshape(len(b), -1)), axis=1)
        if ok.sum() < 0.5 * ok.size:
            return np.inf
        with np.errstate(invalid="ignore", over="ignore"):
            return float(np.sum((a[ok] - b[ok]) ** 2)) / denom

    return distance


def match_variants(got, truth, variants: dict, distance) -> list[str]:
    """The planted variants the output matches, best first.

    A variant is matched when the output lies within a tenth of the
    variant's own distance from the truth, ``dist(got, v) <= 0.1 dist(v, truth)``,
    and nearer to it than to the truth.  Variants that coincide with the truth
    on these inputs (e.g. ``sigma_min`` dropped when ``sigma_min = 0``) are
    skipped: they cannot be told apart.  ``variants`` maps a cause key to an
    array or a zero-argument function computing it (computed only here, on failure).
    """
    d_truth = distance(got, truth)
    found = []
    for key, value in variants.items():
        try:
            with np.errstate(all="ignore"):
                v = np.asarray(value() if callable(value) else value, dtype=np.float64)
        except (ValueError, FloatingPointError, ZeroDivisionError, RuntimeError):
            continue  # a variant that cannot be computed here (RuntimeError: the impl refused it)
        if v.shape != np.shape(truth):
            continue
        separation = distance(truth, v)
        if not np.isfinite(separation) or separation <= 1e-8:
            continue
        d_variant = distance(got, v)
        if d_variant <= 0.1 * separation and d_variant < d_truth:
            found.append((d_variant / separation, key))
    found.sort()
    return [key for _, key in found]


def localised_near_one(err_rows, t, bound_rows) -> bool:
    """Whether the rows over their bound lie toward t = 1 (all at t > 0.5, the worst at t >= 0.99)
    while every row with t <= 0.5 passes: an error that grows as sigma_t -> 0."""
    t = np.broadcast_to(np.asarray(t, dtype=np.float64), err_rows.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = err_rows / np.maximum(bound_rows, np.finfo(float).tiny)
    over = ~(ratio <= 1.0)
    early = t <= 0.5
    if not over.any() or not early.any() or over[early].any():
        return False
    return bool(t[int(np.nanargmax(np.where(np.isfinite(ratio), ratio, np.inf)))] >= 0.99)


def implied_endpoints(path: AffinePath, x_t, u_t, t):
    r"""The :math:`(x_0, x_1)` that a pair :math:`(x_t, u_t)` of the path implies, row by row.

    :math:`x_t = \sigma_t x_0 + \alpha_t x_1` and :math:`u_t = \sigma_t' x_0 + \alpha_t' x_1`
    form a 2x2 system per row with determinant
    :math:`\Delta = \sigma_t \alpha_t' - \alpha_t \sigma_t'`, so
    :math:`x_0 = (\alpha_t' x_t - \alpha_t u_t)/\Delta`,
    :math:`x_1 = (\sigma_t u_t - \sigma_t' x_t)/\Delta`.
    Returns ``(x_0, x_1, det)``; use rows where ``|det|`` is not small.
    """
    tc = _col(t, x_t.shape[0])
    with np.errstate(all="ignore"):
        alpha, sigma = path._alpha(tc), path._sigma(tc)
        d_alpha, d_sigma = path._d_alpha(tc), path._d_sigma(tc)
        det = sigma * d_alpha - alpha * d_sigma
        x_0 = (d_alpha * x_t - alpha * u_t) / det
        x_1 = (sigma * u_t - d_sigma * x_t) / det
    return x_0, x_1, det[:, 0]


def _nearest(a, b):
    """For each row of ``a``: the index of the nearest row of ``b`` and the distance to it."""
    sq = np.sum(a**2, axis=1)[:, None] + np.sum(b**2, axis=1)[None, :] - 2.0 * (a @ b.T)
    j = np.argmin(sq, axis=1)
    return j, np.sqrt(np.maximum(sq[np.arange(a.shape[0]), j], 0.0))


def endpoint_evidence(path: AffinePath, x_0, x_1, x_t, u_t, t, rel_tol: float) -> list[str]:
    """Causes that the implied endpoints (:func:`implied_endpoints`) point to, if any.

    On rows with t in [0.05, 0.95]: the implied :math:`x_0` matching none of
    the rows refflow passed means the implementation drew its own noise; rows
    of :math:`x_0` or :math:`x_1` that match *other* rows of the batch mean it
    re-paired the batch (a coupling).  ``rel_tol`` is the relative distance
    under which two rows count as the same.
    """
    rows = np.flatnonzero((t >= 0.05) & (t <= 0.95))
    if rows.size < 8:
        return []
    x0_hat, x1_hat, det = implied_endpoints(path, x_t[rows], u_t[rows], t[rows])
    ok = np.isfinite(det) & (np.abs(det) > 1e-3) & np.all(np.isfinite(x0_hat), axis=1) & np.all(np.isfinite(x1_hat), axis=1)
    if ok.sum() < 8:
        return []
    x0_hat, x1_hat, rows = x0_hat[ok], x1_hat[ok], rows[ok]
    scale = max(float(np.median(np.abs(x_0))), float(np.median(np.abs(x_1))), 1e-300)
    tol = rel_tol * scale
    same0 = np.max(np.abs(x0_hat - x_0[rows]), axis=1) <= tol
    same1 = np.max(np.abs(x1_hat - x_1[rows]), axis=1) <= tol
    if same0.mean() > 0.9 and same1.mean() > 0.9:
        return []
    j0, dist0 = _nearest(x0_hat, x_0)
    j1, dist1 = _nearest(x1_hat, x_1)
    found0, found1 = dist0 <= tol, dist1 <= tol
    moved = (found0 & (j0 != rows)).mean() > 0.25 or (found1 & (j1 != rows)).mean() > 0.25
    if moved and found0.mean() > 0.75 and found1.mean() > 0.75:
        return ["repairs_batch"]
    return []


def ignores_x0(x_0, x_0_other, x_t, x_t_other) -> bool:
    r"""Whether the implementation's :math:`x_t` does not respond to the :math:`x_0` it is given.

    Two calls differ only in :math:`x_0` (an independent draw for the second).
    A path moves :math:`x_t` by :math:`c_t (x_0' - x_0)` with :math:`c_t = \sigma_t`
    (or whatever its formula puts in front of :math:`x_0`), so the change of
    :math:`x_t` and the change of :math:`x_0` are strongly correlated in every
    coordinate; one that draws its own noise gives correlation about 0
    (standard deviation :math:`1/\sqrt{n}`).  "Does not respond" is a
    correlation below 0.5 in every coordinate while the two changes are not
    parallel row by row (median :math:`|\cos| < 0.99`; a path's are, however
    widely :math:`c_t` varies, as for VE).
    """
    a = x_0_other - x_0
    b = x_t_other - x_t
    with np.errstate(all="ignore"):
        # a path multiplies x_0 by a number per row: the two changes are parallel row by row
        cos = np.sum(a * b, axis=1) / np.sqrt(np.sum(a**2, axis=1) * np.sum(b**2, axis=1))
        parallel = float(np.median(np.abs(np.where(np.isfinite(cos), cos, 0.0)))) >= 0.99
        a = a - a.mean(axis=0)
        b = b - b.mean(axis=0)
        rho = np.sum(a * b, axis=0) / np.sqrt(np.sum(a**2, axis=0) * np.sum(b**2, axis=0))
    rho = np.where(np.isfinite(rho), rho, 0.0)
    return bool(not parallel and np.all(np.abs(rho) < 0.5))
