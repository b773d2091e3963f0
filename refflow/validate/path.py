r"""kind = "path": a conditional path ``(x_0, x_1, t) -> (x_t, u_t)`` (eq 26, 29, 35)."""
from __future__ import annotations

import numpy as np

from refflow._validation import as_rng, check_scalar
from refflow.stats import FAMILY_ALPHA, bonferroni_z, standard_normal_z
from refflow.validate.calling import Caller, ImplementationError, batched, resolve_impl
from refflow.validate.catalog import get_case
from refflow.validate.causes import (
    SquaredSigmaPath,
    endpoint_evidence,
    ignores_x0,
    no_sigma_min,
    pair_velocity_raw,
    sample_raw,
)
from refflow.validate.errors import row_error, row_scale
from refflow.validate.judge import bound_rows, exact_property, inputs_property, richardson_consistency
from refflow.validate.precision import (
    SAFETY,
    f32_exact,
    schedule_perturbations,
    spread,
    test_times,
    time_shifts,
)
from refflow.validate.report import CheckReport, PropertyResult

__all__ = ["check_path", "path_bounds"]


def _col(t, n):
    return np.broadcast_to(np.asarray(t, dtype=np.float64), (n,)).reshape(n, 1)


def path_bounds(path, x_0, x_1, t, unit_roundoff: float):
    r"""Elementwise rounding bounds of :math:`x_t` and :math:`u_t` (see :mod:`refflow.validate.precision`).

    .. math::

        B_x = c u (|\sigma_t x_0| + |\alpha_t x_1|) + \max_\pm |x_{t \pm cu} - x_t|, \qquad
        B_u = c u (|\sigma_t' x_0| + |\alpha_t' x_1|) + \max_\pm |u_{t \pm cu} - u_t|.

    A variance-preserving path adds the change under :math:`\alpha_t \to \alpha_t (1 \pm cu)`
    (:func:`refflow.validate.precision.schedule_perturbations`).  Infinite
    where :math:`\sigma'` is infinite within :math:`cu` of t (VP at t = 1).
    """
    tc = _col(t, x_0.shape[0])
    with np.errstate(all="ignore"):
        terms_x = np.abs(path._sigma(tc) * x_0) + np.abs(path._alpha(tc) * x_1)
        terms_u = np.abs(path._d_sigma(tc) * x_0) + np.abs(path._d_alpha(tc) * x_1)
        x_t = sample_raw(path, x_0, x_1, t)
        u_t = pair_velocity_raw(path, x_0, x_1, t)
        shifted = time_shifts(t, unit_roundoff)
        b_x = SAFETY * unit_roundoff * terms_x + spread(x_t, [sample_raw(path, x_0, x_1, s) for s in shifted])
        b_u = SAFETY * unit_roundoff * terms_u + spread(u_t, [pair_velocity_raw(path, x_0, x_1, s) for s in shifted])
        held = schedule_perturbations(path, unit_roundoff)
        if held:
            b_x += spread(x_t, [sample_raw(p, x_0, x_1, t) for p in held])
            b_u += spread(u_t, [pair_velocity_raw(p, x_0, x_1, t) for p in held])
    b_x[~np.isfinite(b_x)] = np.inf
    b_u[~np.isfinite(b_u)] = np.inf
    return b_x, b_u


def _rule(unit_roundoff, threshold):
    if threshold is not None:
        return f"the threshold {threshold!r} on every row"
    return (f"per row, {SAFETY:g} u x (sum of the formula's terms) + the change under t +- {SAFETY:g} u, "
            f"u = {unit_roundoff:.3g} (the output dtype's unit roundoff): what a backward-stable "
            "implementation in that dtype can make")


def check_path(impl, case, *, threshold=None, n: int = 512, seed=0, batch_size=None) -> CheckReport:
    r"""Check a conditional path ``impl(x_0, x_1, t) -> (x_t, u_t)`` (eq 26, 29, 35).

    Properties
    ----------
    ``x_t``
        :math:`x_t = \psi_t(x_0 \mid x_1) = \sigma_t x_0 + \alpha_t x_1` (eq 26).
    ``u_t``
        The pair velocity, the CFM regression target,
        :math:`u_t = \frac{d}{dt}\psi_t = \sigma_t' x_0 + \alpha_t' x_1` (eq 29, 35-37).
    ``consistency``
        The implementation's ``u_t`` against a Richardson-extrapolated central
        difference of its own ``x_t`` in t (eq 27), with a bound that carries
        the difference's own truncation and rounding: tells a target that does
        not belong to the interpolation from a consistently wrong path.
    ``deterministic``
        A second call with the same inputs gives the same outputs (within the bound).
    ``inputs``
        The implementation left its input arrays unchanged.

    Each row of ``x_t`` and ``u_t`` is held to the rounding bound of the
    output dtype at that row (:func:`path_bounds`); ``threshold`` replaces it
    by one relative error for every row.  An implementation that draws its
    own noise (it ignores ``x_0``) is judged by the law of its ``x_t``
    (``x_t_law``: :math:`(x_t - \alpha_t x_1)/\sigma_t \sim \mathcal N(0, I)`)
    and by ``u_t_given_x_t``: :math:`u_t` against the conditional field at its
    own :math:`x_t`, :math:`\frac{\sigma_t'}{\sigma_t}(x_t - \alpha_t x_1) + \alpha_t' x_1` (eq 30).

    Rows: t = 0, 1 (where :math:`\sigma_t'` is finite), times packed toward
    both ends (:func:`refflow.validate.precision.special_times`) and uniform
    t; :math:`x_1 \sim q_1`, :math:`x_0 \sim \mathcal N(0, I)`, all exact in float32.
    """
    fn, impl_name = resolve_impl(impl)
    case = get_case(case)
    n = check_scalar(n, "n", low=32, integer=True)
    if threshold is not None:
        threshold = check_scalar(threshold, "threshold", low=0.0)
    rng = as_rng(seed)
    path, d = case.path, case.dim
    x_1 = f32_exact(case.target.sample(n, rng))
    x_0 = f32_exact(rng.standard_normal((n, d)))
    t = test_times(n, rng, path=path)
    # the reference first, on refflow's own arrays
    x_t_true = path.sample(x_0, x_1, t)
    u_t_true = path.pair_velocity(x_0, x_1, t)
    caller = Caller(fn, "path(x_0, x_1, t)", ("x_0", "x_1", "t"))

    def call(x0, x1, tt):
        def one(rows):
            out = caller(x0[rows], x1[rows], tt[rows])
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise ImplementationError(
                    f"impl: expected the path function to return a pair (x_t, u_t), got {type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
                )
            m = x0[rows].shape[0]
            return (caller.output(out[0], "x_t (first output)", (m, d)),
                    caller.output(out[1], "u_t (second output)", (m, d)))

        return batched(one, x0.shape[0], batch_size)

    x_t_got, u_t_got = call(x_0, x_1, t)
    x_t_again, u_t_again = call(x_0, x_1, t)
    u = caller.precision
    b_x, b_u = path_bounds(path, x_0, x_1, t, u)
    scale_x, scale_u = row_scale(x_t_true), row_scale(u_t_true)
    if threshold is None:
        bound_x, bound_u = bound_rows(b_x, scale_x), bound_rows(b_u, scale_u)
    else:
        bound_x = bound_u = threshold
    rule = _rule(u, threshold)

    # evidence beyond the values: two calls, the implied endpoints, the inputs
    with np.errstate(invalid="ignore"):
        again_err = np.maximum(row_error(x_t_again, x_t_got, scale_x) - bound_x,
                               row_error(u_t_again, u_t_got, scale_u) - bound_u)
    # rows non-finite in both calls at the same places are the same answer, not randomness
    same_nonfinite = np.all(~np.isfinite(np.hstack([x_t_got, u_t_got])) == ~np.isfinite(np.hstack([x_t_again, u_t_again])), axis=1)
    again_err[same_nonfinite & ~np.isfinite(again_err)] = 0.0
    nondeterministic = bool(np.any(~(again_err <= 0)))
    evidence = endpoint_evidence(path, x_0, x_1, x_t_got, u_t_got, t, rel_tol=max(1e-6, 64.0 * u))
    x_0_other = f32_exact(rng.standard_normal((n, d)))   # drawn after every other input
    x_t_other = call(x_0_other, x_1, t)[0]
    finite = np.all(np.isfinite(x_t_got), axis=1) & np.all(np.isfinite(x_t_other), axis=1)
    own_noise = not evidence and ignores_x0(x_0[finite], x_0_other[finite], x_t_got[finite], x_t_other[finite])
    extra = list(evidence) + (["draws_own_noise"] if own_noise else [])
    if nondeterministic and not own_noise:
        extra.append("nondeterministic")

    squared, no_min = SquaredSigmaPath(path), no_sigma_min(path)
    x_variants = {
        "time_reversed": lambda: sample_raw(path, x_0, x_1, 1.0 - t),
        "sigma_squared": lambda: sample_raw(squared, x_0, x_1, t),
        "x0_x1_swapped": lambda: sample_raw(path, x_1, x_0, t),
        "outputs_swapped": u_t_true,
    }
    u_variants = {
        "time_reversed": lambda: -pair_velocity_raw(path, x_0, x_1, 1.0 - t),
        "time_argument_reversed": lambda: pair_velocity_raw(path, x_0, x_1, 1.0 - t),
        "sign_flipped": lambda: -u_t_true,
        "sigma_squared": lambda: pair_velocity_raw(squared, x_0, x_1, t),
        "x0_x1_swapped": lambda: pair_velocity_raw(path, x_1, x_0, t),
        "outputs_swapped": x_t_true,
    }
    if no_min is not None:
        x_variants["sigma_min_dropped"] = lambda: no_min.sample(x_0, x_1, t)
        u_variants["sigma_min_dropped"] = lambda: no_min.pair_velocity(x_0, x_1, t)
    rows_desc = f"{n} rows: t = 0, 1, packed toward both ends, and uniform; x_1 ~ q_1, x_0 ~ N(0, I)"
    judged = not own_noise
    note = "" if judged else "draws its own noise: judged by x_t_law and u_t_given_x_t"
    props = [
        exact_property("x_t", "x_t = sigma_t x_0 + alpha_t x_1 (eq 26) vs refflow; " + rows_desc,
                       x_t_got, x_t_true, bound_x, t, x_variants, judged=judged, scale=scale_x, rule=rule,
                       extra_causes=extra, note=note),
        exact_property("u_t", "u_t = sigma_t' x_0 + alpha_t' x_1 (eq 29, 35) vs refflow", u_t_got,
                       u_t_true, bound_u, t, u_variants, judged=judged, scale=scale_u, rule=rule,
                       extra_causes=extra, note=note),
    ]
    if own_noise:
        props += [_law_of_x_t(path, x_1, x_t_got, t), _u_given_x_t(path, x_1, x_t_got, u_t_got, t, b_x, b_u)]
    elif not nondeterministic:
        props.append(_consistency(call, path, x_0, x_1, t, u))
    props.append(PropertyResult(
        "deterministic", "a second call with the same inputs gives the same outputs (within the bound)",
        float(np.max(np.maximum(again_err, 0.0))), 0.0 if not own_noise else None,
        (not nondeterministic) if not own_noise else None,
        ["nondeterministic"] if nondeterministic and not own_noise else [],
        note="draws its own noise on every call" if nondeterministic and own_noise else ""))
    props.append(inputs_property(caller))
    return CheckReport("path", case.name, impl_name, props,
                       {"n": n, "seed": seed, "output_dtype": caller.dtype_name, "threshold": threshold})


def _consistency(call, path, x_0, x_1, t, unit_roundoff) -> PropertyResult:
    """u_t against a Richardson difference of the implementation's own x_t (see :func:`richardson_consistency`)."""
    return richardson_consistency(
        lambda rows, tc: call(x_0[rows], x_1[rows], tc),
        lambda rows, tc: path_bounds(path, x_0[rows], x_1[rows], tc, unit_roundoff),
        t, unit_roundoff, "")


def _law_of_x_t(path, x_1, x_t, t) -> PropertyResult:
    r"""For an implementation with noise of its own: :math:`(x_t - \alpha_t x_1)/\sigma_t \sim \mathcal N(0, I)`."""
    tc = _col(t, x_t.shape[0])
    sigma = path._sigma(tc)[:, 0]
    rows = np.flatnonzero((sigma >= 0.05) & (t <= 0.95))
    eps = (x_t[rows] - path._alpha(tc[rows]) * x_1[rows]) / sigma[rows, None]
    m, d = eps.shape
    z_mean, z_var = standard_normal_z(eps)
    z = float(max(z_mean.max(), z_var.max()))
    tol = bonferroni_z(2 * d, FAMILY_ALPHA)
    passed = bool(z <= tol)
    return PropertyResult(
        "x_t_law", f"max |z| of the mean and variance of (x_t - alpha_t x_1) / sigma_t vs N(0, 1), per "
                   f"coordinate, {m} rows with sigma_t >= 0.05 (Bonferroni over {2 * d})",
        z, tol, passed, [] if passed else ["sigma_squared"] if np.median(z_var) > np.median(z_mean) else [],
        {"z_mean": z_mean.tolist(), "z_var": z_var.tolist()})


def _u_given_x_t(path, x_1, x_t, u_t, t, b_x, b_u) -> PropertyResult:
    r"""u_t against the conditional field at the implementation's own x_t (eq 30), rows with sigma_t >= 0.05."""
    tc = _col(t, x_t.shape[0])
    sigma = path._sigma(tc)
    rows = np.flatnonzero((sigma[:, 0] >= 0.05) & (t <= 0.95))
    gain = path._d_sigma(tc[rows]) / sigma[rows]
    expected = gain * (x_t[rows] - path._alpha(tc[rows]) * x_1[rows]) + path._d_alpha(tc[rows]) * x_1[rows]
    allowed = b_u[rows] + np.abs(gain) * b_x[rows]
    scale = row_scale(expected)
    err = row_error(u_t[rows], expected, scale)
    bound = bound_rows(allowed, scale)
    ratio = np.where(np.isfinite(err), err / np.maximum(bound, np.finfo(float).tiny), np.inf)
    worst = int(np.argmax(ratio))
    passed = bool(np.all(err <= bound))
    return PropertyResult(
        "u_t_given_x_t", "u_t vs sigma_t'/sigma_t (x_t - alpha_t x_1) + alpha_t' x_1 at the implementation's "
                         f"own x_t (eq 30), {rows.size} rows with sigma_t >= 0.05",
        float(err[worst]), float(bound[worst]), passed, [] if passed else ["noise_redrawn"])
