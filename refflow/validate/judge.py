"""Judging an exact quantity row by row against its rounding bound, and naming what went wrong."""
from __future__ import annotations

import numpy as np

from refflow.validate.causes import localised_near_one, match_variants, max_row_distance
from refflow.validate.errors import row_error, row_scale
from refflow.validate.report import PropertyResult

__all__ = ["exact_property", "bound_rows", "inputs_property", "richardson_consistency"]


def bound_rows(bound, scale) -> np.ndarray:
    """A per-element bound as a per-row one on the scale of :func:`row_error`: ``max_j bound_ij / s_i``."""
    bound = np.asarray(bound, dtype=np.float64)
    n = bound.shape[0]
    with np.errstate(invalid="ignore", over="ignore"):
        return np.max(bound.reshape(n, -1), axis=1) / scale


def exact_property(name, compared, got, truth, bound, t, variants, *, judged=True, details=None,
                   scale=None, note="", rule="", extra_causes=()):
    """Compare ``got`` with ``truth`` row by row, each row against its own bound.

    Parameters
    ----------
    got, truth : arrays, shape (n, ...)
    bound : array (n,) or float
        The allowed row error (on the scale of :func:`row_error`): a float
        for a user's threshold, the rounding bound of each row otherwise.
    t : array (n,) or None
        The rows' times (for the diagnosis "precision lost near t = 1" and the report).
    variants : dict
        Planted wrong variants (see :func:`refflow.validate.causes.match_variants`).
    rule : str
        The tolerance in words, for the report.
    extra_causes : sequence of str
        Causes found by other evidence, named before the variants.

    Rows that are not finite fail and are counted (unless their bound is
    infinite: the quantity is infinite within the rounding of the inputs
    there); the other rows are still judged and diagnosed.  ``error`` and ``tolerance`` are those of the
    finite row furthest over (or closest to) its bound, so that ``error <=
    tolerance`` exactly when every finite row passes; ``details["max_error"]``
    is the largest row error.
    """
    n = truth.shape[0]
    scale = row_scale(truth) if scale is None else scale
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), (n,))
    err_rows = row_error(got, truth, scale)
    got_rows = np.asarray(got, dtype=np.float64).reshape(n, -1)
    finite = np.all(np.isfinite(got_rows), axis=1)
    details = dict(details or {})
    if rule:
        details["tolerance_rule"] = rule
    if finite.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(finite, err_rows / np.maximum(bound, np.finfo(float).tiny), -np.inf)
        worst = int(np.argmax(ratio))
        # the row furthest over its bound (or closest to it): error <= tolerance exactly when all pass
        error = float(err_rows[worst])
        tol = float(bound[worst])
        details["max_error"] = float(np.max(err_rows[finite]))
        details["worst_ratio"] = float(ratio[worst])
        details["worst_error"] = float(err_rows[worst])
        details["worst_bound"] = tol
        details["worst_t"] = None if t is None else float(np.broadcast_to(t, (n,))[worst])
        rows_ok = bool(np.all(err_rows[finite] <= bound[finite]))
    else:
        error, tol, rows_ok = float("inf"), float(np.max(bound)), False
    # a non-finite answer where the quantity itself is infinite within the rounding of the inputs
    # (sigma_t' at t = 1 for VP, within c u of t) is what a correct implementation may return
    excused = ~finite & ~np.isfinite(bound)
    if excused.any():
        details["nonfinite_excused_rows"] = int(excused.sum())
    nonfinite = int((~finite & ~excused).sum())
    if nonfinite:
        details["nonfinite_rows"] = nonfinite
        if t is not None:
            bad_t = np.broadcast_to(np.asarray(t, dtype=np.float64), (n,))[~finite & ~excused]
            details["nonfinite_at_t"] = sorted({float(v) for v in bad_t})[:5]
    passed = bool(rows_ok and nonfinite == 0) if judged else None
    causes = list(extra_causes) if judged and not passed else []
    if judged and not passed:
        if nonfinite:
            causes.append("nonfinite")
        over_finite = finite & ~(err_rows <= bound)
        if over_finite.any():
            keep = finite
            sub = {k: (lambda v=v: _rows_of(v, keep)) for k, v in variants.items()}
            for c in match_variants(got[keep], truth[keep], sub, max_row_distance(scale[keep])):
                if c not in causes:
                    causes.append(c)
            if t is not None and not any(c not in ("nonfinite",) for c in causes[len(extra_causes):]):
                tt = np.broadcast_to(np.asarray(t, dtype=np.float64), (n,))
                if localised_near_one(err_rows[keep], tt[keep], bound[keep]):
                    causes.append("precision_near_t1")
    return PropertyResult(name, compared, error, tol if judged else None, passed, causes, details, note)


def _rows_of(value, keep):
    v = value() if callable(value) else value
    return np.asarray(v)[keep]


def inputs_property(caller) -> PropertyResult:
    """The ``inputs`` property: fails, with the cause ``modified_inputs``, when a call changed its arguments."""
    modified = sorted(caller.modified)
    return PropertyResult(
        "inputs", "the implementation left the arrays it was given unchanged (refflow judged it on its own copy)",
        float(len(modified)), 0.0, not modified, ["modified_inputs"] if modified else [],
        {"modified": modified})


def richardson_consistency(call_at, bounds_at, t, unit_roundoff, what: str) -> PropertyResult:
    r"""The ``consistency`` property: u_t against a Richardson-extrapolated central difference of x_t (eq 27).

    With :math:`D(h) = (x_{t+h} - x_{t-h}) / 2h`, :math:`R = (4 D(h) - D(2h))/3`
    has truncation :math:`O(h^4)`, below :math:`|D(h) - D(2h)|` (three times
    :math:`D(h)`'s own :math:`h^2` term); rounding errors :math:`B_x` of each
    :math:`x` reach :math:`R` as at most :math:`1.5 B_x / h`.  The step
    :math:`h \approx u^{1/3}` balances the two.  Times are moved to a
    :math:`2^{-8}` grid, so :math:`t \pm h, t \pm 2h` are exact in every dtype.

    Parameters
    ----------
    call_at : callable
        ``call_at(rows, times) -> (x_t, u_t)``: the implementation on the
        given rows (their other inputs fixed) at other times.
    bounds_at : callable
        ``bounds_at(rows, times) -> (B_x, B_u)``: the rounding bounds there.
    t : array (n,)
    unit_roundoff : float
    what : str
        What is held fixed, for the report.
    """
    h = 2.0 ** round(np.log2(unit_roundoff ** (1.0 / 3.0)))
    # t +- 2h strictly inside (0, 1) after the move to the grid: sigma' may be infinite at t = 1
    low, high = max(0.05, 2.0 * h + 2.0**-7), min(0.95, 1.0 - 2.0 * h - 2.0**-7)
    rows = np.flatnonzero((t >= low) & (t <= high))[:64]
    if rows.size == 0:
        return PropertyResult("consistency", "no rows in range", 0.0, None, None)
    tc = np.round(t[rows] * 2.0**8) / 2.0**8
    x_p1, x_m1 = call_at(rows, tc + h)[0], call_at(rows, tc - h)[0]
    x_p2, x_m2 = call_at(rows, tc + 2 * h)[0], call_at(rows, tc - 2 * h)[0]
    u_mid = call_at(rows, tc)[1]
    d_h = (x_p1 - x_m1) / (2.0 * h)
    d_2h = (x_p2 - x_m2) / (4.0 * h)
    richardson = (4.0 * d_h - d_2h) / 3.0
    b_x, b_u = bounds_at(rows, tc)
    allowed = b_u + 1.5 * b_x / h + np.abs(d_h - d_2h)
    scale = row_scale(richardson)
    err = row_error(u_mid, richardson, scale)
    bound = bound_rows(allowed, scale)
    ratio = np.where(np.isfinite(err), err / np.maximum(bound, np.finfo(float).tiny), np.inf)
    worst = int(np.argmax(ratio))
    passed = bool(np.all(err <= bound))
    return PropertyResult(
        "consistency",
        f"the implementation's u_t vs a Richardson-extrapolated central difference (h = 2^{int(np.log2(h))}) "
        f"of its own x_t in t{what} (eq 27), {rows.size} rows with t in [{low:g}, {high:g}]",
        float(err[worst]), float(bound[worst]), passed, [] if passed else ["target_inconsistent"],
        {"tolerance_rule": "per row, u_t's rounding bound + 1.5 B_x / h (rounding through the difference) "
                           "+ |D(h) - D(2h)| (truncation)", "worst_t": float(tc[worst])},
    )
