r"""kind = "path" on an interpolant case: ``(x_0, x_1, t, eps) -> (x_t, u_t)`` or ``(x_0, x_1, t) -> (x_t, u_t)``.

The two-sided paths of :mod:`refflow.interpolants`,
:math:`x_t = a_t x_0 + b_t x_1 + \gamma_t \epsilon` with the pair velocity
:math:`u_t = a_t' x_0 + b_t' x_1 + \gamma_t' \epsilon`.

Calling convention, told apart by the signature: a function with four
positional parameters (or ``*args``) receives refflow's noise ``eps`` and is
judged *exactly*, row by row against the rounding bound of its output dtype
(the rule of :mod:`refflow.validate.precision`: :math:`c u` times the sum
:math:`|a_t x_0| + |b_t x_1| + |\gamma_t \epsilon|` of the formula's terms,
plus the change of the quantity under :math:`t \pm c u`).  A function of
three, which draws its noise itself (TorchCFM's
``sample_location_and_conditional_flow``), is judged *statistically*: the noise
it used, :math:`\hat\epsilon = (x_t - a_t x_0 - b_t x_1)/\gamma_t`, must be
standard normal (z-tests of mean and variance, Bonferroni), and its
:math:`u_t` must belong to its own :math:`x_t`:
:math:`u_t = \frac{\gamma_t'}{\gamma_t}(x_t - a_t x_0 - b_t x_1) + a_t' x_0 + b_t' x_1`,
exactly.  ``noise="given"`` / ``noise="own"`` overrides the detection.
"""
from __future__ import annotations

import inspect

import numpy as np

from refflow._validation import as_rng, check_scalar
from refflow.interpolants import Interpolant
from refflow.stats import FAMILY_ALPHA, bonferroni_z, standard_normal_z
from refflow.validate.calling import Caller, ImplementationError, batched, resolve_impl
from refflow.validate.catalog import get_case
from refflow.validate.errors import row_error, row_scale
from refflow.validate.judge import bound_rows, exact_property, inputs_property, richardson_consistency
from refflow.validate.precision import SAFETY, f32_exact, special_times, spread, time_shifts
from refflow.validate.report import CheckReport, PropertyResult

__all__ = ["check_interpolant", "interpolant_bounds", "takes_noise"]


def takes_noise(fn) -> bool:
    """Whether ``fn`` takes a fourth positional argument (refflow's ``eps``); ``*args`` counts as yes."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    params = list(sig.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 4 and positional[3].default is inspect.Parameter.empty


def _col(t, n):
    return np.broadcast_to(np.asarray(t, dtype=np.float64), (n,)).reshape(n, 1)


def _x_raw(ip, x_0, x_1, t, eps):
    tc = _col(t, x_0.shape[0])
    with np.errstate(all="ignore"):
        return ip._a(tc) * x_0 + ip._b(tc) * x_1 + ip._gamma(tc) * eps


def _u_raw(ip, x_0, x_1, t, eps, with_gamma=True):
    tc = _col(t, x_0.shape[0])
    with np.errstate(all="ignore"):
        u = ip._d_a(tc) * x_0 + ip._d_b(tc) * x_1
        return u + ip._d_gamma(tc) * eps if with_gamma else u


class _Scaled(Interpolant):
    """Planted bug: gamma_t^2 for gamma_t (variance for standard deviation), or time reversed."""

    def __init__(self, base, how):
        self.base, self.how = base, how

    def _a(self, t):
        return self.base._a(t)

    def _b(self, t):
        return self.base._b(t)

    def _d_a(self, t):
        return self.base._d_a(t)

    def _d_b(self, t):
        return self.base._d_b(t)

    def _gamma(self, t):
        g = self.base._gamma(t)
        return g**2 if self.how == "squared" else 0.0 * g

    def _d_gamma(self, t):
        if self.how == "squared":
            with np.errstate(all="ignore"):
                return 2.0 * self.base._gamma_d_gamma(t)
        return 0.0 * self.base._gamma(t)


def _regularised_u(ip, x_0, x_1, t, eps, kappa=1e-8):
    r"""Planted variant: :math:`\gamma'/\gamma` computed as :math:`\gamma\gamma' / (\gamma^2 + \kappa\,\sigma^2/2)`.

    For the Brownian bridge this is TorchCFM's
    :math:`(1 - 2t) / (2t(1 - t) + 10^{-8})`; a constant noise level
    (:math:`\gamma' = 0`) is unaffected.
    """
    tc = _col(t, x_0.shape[0])
    sigma = getattr(ip, "sigma", 1.0)
    with np.errstate(all="ignore"):
        g = ip._gamma(tc)
        ratio = ip._gamma_d_gamma(tc) / (g**2 + kappa * sigma**2 / 2.0)
        return _u_raw(ip, x_0, x_1, t, eps, with_gamma=False) + ratio * g * eps


def interpolant_bounds(ip, x_0, x_1, t, eps, unit_roundoff: float):
    r"""Elementwise rounding bounds of :math:`x_t` and :math:`u_t`.

    .. math::

        B_x = c u (|a_t x_0| + |b_t x_1| + |\gamma_t \epsilon|) + \max_\pm |x_{t \pm cu} - x_t|,
        \qquad
        B_u = c u (|a_t' x_0| + |b_t' x_1| + |\gamma_t' \epsilon|) + \max_\pm |u_{t \pm cu} - u_t|.

    Infinite where :math:`\gamma_t'` is infinite within :math:`cu` of t (the
    Brownian bridge next to t = 0 and t = 1).
    """
    tc = _col(t, x_0.shape[0])
    with np.errstate(all="ignore"):
        terms_x = np.abs(ip._a(tc) * x_0) + np.abs(ip._b(tc) * x_1) + np.abs(ip._gamma(tc) * eps)
        terms_u = np.abs(ip._d_a(tc) * x_0) + np.abs(ip._d_b(tc) * x_1) + np.abs(ip._d_gamma(tc) * eps)
        x_t, u_t = _x_raw(ip, x_0, x_1, t, eps), _u_raw(ip, x_0, x_1, t, eps)
        shifted = time_shifts(t, unit_roundoff)
        b_x = SAFETY * unit_roundoff * terms_x + spread(x_t, [_x_raw(ip, x_0, x_1, s, eps) for s in shifted])
        b_u = SAFETY * unit_roundoff * terms_u + spread(u_t, [_u_raw(ip, x_0, x_1, s, eps) for s in shifted])
    b_x[~np.isfinite(b_x)] = np.inf
    b_u[~np.isfinite(b_u)] = np.inf
    return b_x, b_u


def _times(ip, n, rng):
    special = list(special_times())
    try:
        ip.pair_velocity(np.zeros((2, 1)), np.zeros((2, 1)), np.array([0.0, 1.0]), np.zeros((2, 1)))
    except ValueError:
        special = [s for s in special if 0.0 < s < 1.0]
    k = min(len(special), n)
    return f32_exact(np.concatenate([special[:k], rng.uniform(0.0, 1.0, n - k)]))


def _correlation(a, b) -> np.ndarray:
    """Per-coordinate correlation of two (m, d) arrays (0 where undefined)."""
    with np.errstate(all="ignore"):
        a = a - a.mean(axis=0)
        b = b - b.mean(axis=0)
        rho = np.sum(a * b, axis=0) / np.sqrt(np.sum(a**2, axis=0) * np.sum(b**2, axis=0))
    return np.where(np.isfinite(rho), rho, 0.0)


def _implied_noise(ip, x_0, x_1, t, x_t, u_t):
    r"""The noise the outputs imply: :math:`(x_t - a x_0 - b x_1)/\gamma` and :math:`(u_t - a' x_0 - b' x_1)/\gamma'`."""
    tc = _col(t, x_0.shape[0])
    with np.errstate(all="ignore"):
        g, dg = np.broadcast_to(ip._gamma(tc), tc.shape)[:, 0], np.broadcast_to(ip._d_gamma(tc), tc.shape)[:, 0]
        e_x = (x_t - ip._a(tc) * x_0 - ip._b(tc) * x_1) / g[:, None]
        e_u = (u_t - _u_raw(ip, x_0, x_1, t, x_0, with_gamma=False)) / dg[:, None]
    rows_x = np.flatnonzero((g >= 0.05) & np.all(np.isfinite(e_x), axis=1))
    rows_u = np.flatnonzero((np.abs(dg) >= 0.05) & np.isfinite(dg) & np.all(np.isfinite(e_u), axis=1))
    return e_x, rows_x, e_u, rows_u


def check_interpolant(impl, case, *, threshold=None, n: int = 512, seed=0, batch_size=None,
                      noise=None) -> CheckReport:
    r"""Check an interpolant path ``impl`` on an interpolant case (module docstring).

    Properties
    ----------
    ``x_t``, ``u_t``
        (noise given) :math:`a_t x_0 + b_t x_1 + \gamma_t\epsilon` and
        :math:`a_t' x_0 + b_t' x_1 + \gamma_t'\epsilon` vs refflow, row by row.
    ``consistency``
        (noise given) ``u_t`` against a Richardson-extrapolated central
        difference in t of the implementation's own ``x_t`` at fixed
        :math:`(x_0, x_1, \epsilon)`.
    ``x_t_law``, ``u_t_given_x_t``
        (own noise) the implied noise is :math:`\mathcal N(0, I)`; ``u_t`` is
        the velocity of the implementation's own ``x_t``.
    ``deterministic``, ``inputs``
        As for the Gaussian paths.

    Rows: times packed toward both ends and uniform t (t = 0 and 1 where
    :math:`\gamma_t'` is finite there); :math:`x_1 \sim q_1`;
    :math:`x_0, \epsilon \sim \mathcal N(0, I)`; all exact in float32.
    """
    fn, impl_name = resolve_impl(impl)
    case = get_case(case)
    ip = case.path
    if not isinstance(ip, Interpolant):
        raise ValueError(f"case: expected an interpolant case (path x_t = a_t x_0 + b_t x_1 + gamma_t eps), "
                         f"got {case.name!r}")
    n = check_scalar(n, "n", low=32, integer=True)
    if threshold is not None:
        threshold = check_scalar(threshold, "threshold", low=0.0)
    if noise not in (None, "given", "own"):
        raise ValueError(f"noise: expected 'given', 'own' or None (detect from the signature), got {noise!r}")
    given = takes_noise(fn) if noise is None else noise == "given"
    rng = as_rng(seed)
    d = case.dim
    x_1 = f32_exact(case.target.sample(n, rng))
    x_0 = f32_exact(rng.standard_normal((n, d)))
    eps = f32_exact(rng.standard_normal((n, d)))
    t = _times(ip, n, rng)
    x_t_true = _x_raw(ip, x_0, x_1, t, eps)
    u_t_true = _u_raw(ip, x_0, x_1, t, eps)
    signature = "path(x_0, x_1, t, eps)" if given else "path(x_0, x_1, t)"
    caller = Caller(fn, signature, ("x_0", "x_1", "t", "eps") if given else ("x_0", "x_1", "t"))

    def call(x0, x1, tt, ee):
        def one(rows):
            args = (x0[rows], x1[rows], tt[rows]) + ((ee[rows],) if given else ())
            out = caller(*args)
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise ImplementationError(
                    f"impl: expected the path function to return a pair (x_t, u_t), got {type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
            m = x0[rows].shape[0]
            return (caller.output(out[0], "x_t (first output)", (m, d)),
                    caller.output(out[1], "u_t (second output)", (m, d)))

        return batched(one, x0.shape[0], batch_size)

    x_t_got, u_t_got = call(x_0, x_1, t, eps)
    x_t_again, u_t_again = call(x_0, x_1, t, eps)
    u = caller.precision
    b_x, b_u = interpolant_bounds(ip, x_0, x_1, t, eps, u)
    scale_x, scale_u = row_scale(x_t_true), row_scale(u_t_true)
    if threshold is None:
        bound_x, bound_u = bound_rows(b_x, scale_x), bound_rows(b_u, scale_u)
    else:
        bound_x = bound_u = threshold
    with np.errstate(invalid="ignore"):
        again = np.maximum(row_error(x_t_again, x_t_got, scale_x) - bound_x,
                           row_error(u_t_again, u_t_got, scale_u) - bound_u)
    both_bad = np.all(~np.isfinite(np.hstack([x_t_got, u_t_got])) == ~np.isfinite(np.hstack([x_t_again, u_t_again])), axis=1)
    again[both_bad & ~np.isfinite(again)] = 0.0
    nondeterministic = bool(np.any(~(again <= 0)))

    # the noise the outputs imply: does x_t use refflow's eps, does u_t use the same noise as x_t?
    e_x, rows_x, e_u, rows_u = _implied_noise(ip, x_0, x_1, t, x_t_got, u_t_got)
    own_noise = not given
    extra_x, extra_u = [], []
    # noise that is spread like eps but is not refflow's: drawn by the implementation
    if (given and rows_x.size >= 16 and np.all(np.std(e_x[rows_x], axis=0) > 0.5)
            and np.all(np.abs(_correlation(e_x[rows_x], eps[rows_x])) < 0.5)):
        own_noise = True
        extra_x = extra_u = ["draws_own_noise"]
    elif given and rows_u.size >= 16:
        both = np.intersect1d(rows_x, rows_u)
        # noise of its own in u_t (spread like eps) that is not the noise of x_t
        if (both.size >= 16 and np.all(np.std(e_u[both], axis=0) > 0.5)
                and np.all(np.abs(_correlation(e_u[both], e_x[both])) < 0.5)):
            extra_u = ["noise_redrawn"]
    if nondeterministic and not own_noise:
        extra_x, extra_u = extra_x + ["nondeterministic"], extra_u + ["nondeterministic"]
    repaired = own_noise and _repairs_batch(call, ip, x_0, x_1, t, eps, u_t_got)

    squared, noiseless = _Scaled(ip, "squared"), _Scaled(ip, "dropped")
    x_variants = {
        "time_reversed": lambda: _x_raw(ip, x_0, x_1, 1.0 - t, eps),
        "x0_x1_swapped": lambda: _x_raw(ip, x_1, x_0, t, eps),
        "sigma_squared": lambda: _x_raw(squared, x_0, x_1, t, eps),
        "noise_dropped": lambda: _x_raw(noiseless, x_0, x_1, t, eps),
        "outputs_swapped": u_t_true,
    }
    u_variants = {
        "gamma_derivative_dropped": lambda: _u_raw(ip, x_0, x_1, t, eps, with_gamma=False),
        "time_reversed": lambda: -_u_raw(ip, x_0, x_1, 1.0 - t, eps),
        "time_argument_reversed": lambda: _u_raw(ip, x_0, x_1, 1.0 - t, eps),
        "sign_flipped": lambda: -u_t_true,
        "x0_x1_swapped": lambda: _u_raw(ip, x_1, x_0, t, eps),
        "sigma_squared": lambda: _u_raw(squared, x_0, x_1, t, eps),
        "outputs_swapped": x_t_true,
        "denominator_regularised": lambda: _regularised_u(ip, x_0, x_1, t, eps),
    }
    rule = (f"the threshold {threshold!r} on every row" if threshold is not None else
            f"per row, {SAFETY:g} u x (|a_t x_0| + |b_t x_1| + |gamma_t eps|, resp. with a', b', gamma') + the "
            f"change under t +- {SAFETY:g} u, u = {u:.3g} (the output dtype's unit roundoff)")
    rows_desc = f"{n} rows: t packed toward both ends and uniform; x_1 ~ q_1, x_0, eps ~ N(0, I)"
    judged = not own_noise
    note = "" if judged else "draws its own noise: judged by x_t_law and u_t_given_x_t"
    props = [
        exact_property("x_t", "x_t = a_t x_0 + b_t x_1 + gamma_t eps vs refflow; " + rows_desc, x_t_got, x_t_true,
                       bound_x, t, x_variants, judged=judged, scale=scale_x, rule=rule, extra_causes=extra_x,
                       note=note),
        exact_property("u_t", "u_t = a_t' x_0 + b_t' x_1 + gamma_t' eps vs refflow", u_t_got, u_t_true, bound_u, t,
                       u_variants, judged=judged, scale=scale_u, rule=rule, extra_causes=extra_u, note=note),
    ]
    if own_noise:
        own = [_law_of_noise(e_x[rows_x]), _u_given_x_t(ip, x_0, x_1, t, x_t_got, u_t_got, u, e_x, rows_x)]
        for prop in own:
            if repaired and prop.passed is False:
                prop.causes = ["repairs_batch"]
        props += own
    elif not nondeterministic:
        props.append(_consistency(call, ip, x_0, x_1, t, eps, u))
    props.append(PropertyResult(
        "deterministic", "a second call with the same inputs gives the same outputs (within the bound)",
        float(np.max(np.maximum(again, 0.0))), None if own_noise else 0.0,
        None if own_noise else not nondeterministic,
        ["nondeterministic"] if nondeterministic and not own_noise else [],
        note="draws its own noise on every call" if nondeterministic and own_noise else ""))
    props.append(inputs_property(caller))
    return CheckReport("path", case.name, impl_name, props,
                       {"n": n, "seed": seed, "noise": "given" if given else "own",
                        "output_dtype": caller.dtype_name, "threshold": threshold})


def _law_of_noise(e) -> PropertyResult:
    m, d = e.shape
    z_mean, z_var = standard_normal_z(e)
    z = float(max(z_mean.max(), z_var.max()))
    tol = bonferroni_z(2 * d, FAMILY_ALPHA)
    passed = bool(z <= tol)
    return PropertyResult(
        "x_t_law", f"max |z| of the mean and variance of (x_t - a_t x_0 - b_t x_1) / gamma_t vs N(0, 1), per "
                   f"coordinate, {m} rows with gamma_t >= 0.05 (Bonferroni over {2 * d})",
        z, tol, passed, [] if passed else (["noise_dropped"] if np.max((e**2).mean(axis=0)) < 1e-2 else
                                           ["sigma_squared"] if np.median(z_var) > np.median(z_mean) else []),
        {"z_mean": z_mean.tolist(), "z_var": z_var.tolist()})


def _u_given_x_t(ip, x_0, x_1, t, x_t, u_t, unit_roundoff, e_x, rows) -> PropertyResult:
    r"""u_t against the velocity of the implementation's own x_t: gamma'/gamma (x_t - a x_0 - b x_1) + a' x_0 + b' x_1."""
    if rows.size == 0:
        return PropertyResult("u_t_given_x_t", "no rows with gamma_t >= 0.05", 0.0, None, None)
    x0, x1, tt, e = x_0[rows], x_1[rows], t[rows], e_x[rows]
    expected = _u_raw(ip, x0, x1, tt, e)
    b_x, b_u = interpolant_bounds(ip, x0, x1, tt, e, unit_roundoff)
    tc = _col(tt, rows.size)
    gain = np.abs(np.broadcast_to(ip._d_gamma(tc) / ip._gamma(tc), tc.shape))
    allowed = b_u + gain * b_x
    scale = row_scale(expected)
    err = row_error(u_t[rows], expected, scale)
    bound = bound_rows(allowed, scale)
    ratio = np.where(np.isfinite(err), err / np.maximum(bound, np.finfo(float).tiny), np.inf)
    worst = int(np.argmax(ratio))
    passed = bool(np.all(err <= bound))
    causes = []
    if not passed:
        no_gamma = _u_raw(ip, x0, x1, tt, e, with_gamma=False)
        residual = u_t[rows] - no_gamma
        if float(np.max(row_error(u_t[rows], no_gamma, scale))) <= 0.1 * float(np.max(row_error(expected, no_gamma, scale))):
            causes.append("gamma_derivative_dropped")
        elif np.all(np.std(residual, axis=0) > 0.0) and np.all(np.abs(_correlation(residual, e)) < 0.5):
            causes.append("noise_redrawn")
    return PropertyResult(
        "u_t_given_x_t", "u_t vs gamma_t'/gamma_t (x_t - a_t x_0 - b_t x_1) + a_t' x_0 + b_t' x_1 at the "
                         f"implementation's own x_t, {rows.size} rows with gamma_t >= 0.05",
        float(err[worst]), float(bound[worst]), passed, causes,
        {"tolerance_rule": "per row, u_t's rounding bound + |gamma'/gamma| x the rounding bound of x_t",
         "worst_t": float(tt[worst])})


def _consistency(call, ip, x_0, x_1, t, eps, unit_roundoff) -> PropertyResult:
    """u_t against a Richardson difference of the implementation's own x_t at fixed (x_0, x_1, eps)
    (:func:`refflow.validate.judge.richardson_consistency`, as for the Gaussian paths)."""
    return richardson_consistency(
        lambda rows, tc: call(x_0[rows], x_1[rows], tc, eps[rows]),
        lambda rows, tc: interpolant_bounds(ip, x_0[rows], x_1[rows], tc, eps[rows], unit_roundoff),
        t, unit_roundoff, " at fixed (x_0, x_1, eps)")


def _repairs_batch(call, ip, x_0, x_1, t, eps, u_t) -> bool:
    r"""Whether an implementation with noise of its own re-pairs the batch (a coupling, not a path).

    Where :math:`\gamma' = 0` at every row (I-CFM), :math:`u_t = a_t' x_0 + b_t' x_1`
    holds without noise, so each row of :math:`u_t` is searched among all
    pairs :math:`a_t' x_0^{(i)} + b_t' x_1^{(j)}`.  Otherwise, where
    :math:`\gamma_0 = 0` (the Brownian bridge), a call at t = 0 returns
    :math:`x_t = x_0` exactly, row for row, unless the rows were moved.
    Re-paired: most probe rows found, a quarter or more at another row.
    """
    n = x_0.shape[0]
    k = min(n, 48)
    tc = _col(t, n)
    dg = np.broadcast_to(ip._d_gamma(tc), tc.shape)[:, 0]
    scale = max(float(np.max(np.abs(x_0))), float(np.max(np.abs(x_1))), 1.0)
    tol = 1e-4 * scale
    if np.all(dg == 0.0):
        rows = np.flatnonzero(np.all(np.isfinite(u_t), axis=1))[:k]
        if rows.size < 8:
            return False
        da, db = ip._d_a(tc[rows]), ip._d_b(tc[rows])          # (k, 1) or scalars
        da = np.broadcast_to(da, (rows.size, 1))
        db = np.broadcast_to(db, (rows.size, 1))
        # candidates[r, i, j] = a' x_0[i] + b' x_1[j] for probe row r
        found = moved = 0
        for r, row in enumerate(rows):
            pairs = da[r] * x_0[:, None, :] + db[r] * x_1[None, :, :]
            dist = np.max(np.abs(pairs - u_t[row]), axis=2)
            i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)
            if dist[i, j] <= tol:
                found += 1
                moved += int(i != row or j != row)
        return found >= 0.75 * rows.size and moved >= 0.25 * rows.size
    if not np.all(np.asarray(ip._gamma(np.zeros(1))) == 0.0):
        return False
    # just after t = 0 (gamma_t' is infinite at 0 itself): x_t = x_0 + O(2^-20)
    try:
        x_t0 = call(x_0[:k], x_1[:k], np.full(k, 2.0**-40), eps[:k])[0]
    except ImplementationError:
        return False
    sq = np.sum(x_t0**2, axis=1)[:, None] + np.sum(x_0[:k] ** 2, axis=1)[None, :] - 2.0 * x_t0 @ x_0[:k].T
    j = np.argmin(sq, axis=1)
    hit = np.max(np.abs(x_t0 - x_0[:k][j]), axis=1) <= tol
    return hit.mean() >= 0.75 and (hit & (j != np.arange(k))).mean() >= 0.25
